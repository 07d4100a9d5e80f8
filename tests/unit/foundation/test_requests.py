import math

import pytest

from adaccel.v1 import common_pb2
from common.requests import RequestLimits, validate_generate_request
from common.rpc.errors import InvalidArgument, ResourceExhausted

LIMITS = RequestLimits(max_blocks=4, max_block_chars=100, max_prompt_chars=250, max_new_tokens=64)


def good_request(**params) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id="r1", pool_key="electronics/headphones",
        blocks=[common_pb2.PromptBlock(id="instr-1", kind=common_pb2.BLOCK_KIND_INSTRUCTION, text="Write.\n"),
                common_pb2.PromptBlock(id="item-7", kind=common_pb2.BLOCK_KIND_ITEM, text="Headphones.\n")],
        params=common_pb2.GenerationParams(max_new_tokens=params.pop("max_new_tokens", 16), **params),
    )


def test_good_request_passes():
    validate_generate_request(good_request(), LIMITS)


def mutate(fn):
    req = good_request()
    fn(req)
    return req


@pytest.mark.parametrize("mutation, field", [
    (lambda r: r.ClearField("blocks"), "blocks"),
    (lambda r: setattr(r.blocks[0], "kind", common_pb2.BLOCK_KIND_UNSPECIFIED), "blocks[0].kind"),
    (lambda r: setattr(r.blocks[1], "kind", 99), "blocks[1].kind"),
    (lambda r: setattr(r.blocks[1], "id", ""), "blocks[1].id"),
    (lambda r: setattr(r.blocks[1], "id", "bad id with spaces"), "blocks[1].id"),
    (lambda r: setattr(r.blocks[0], "text", ""), "blocks[0].text"),
    (lambda r: setattr(r, "pool_key", "a" * 129), "pool_key"),
    (lambda r: setattr(r, "pool_key", "bad\x00key"), "pool_key"),
    (lambda r: setattr(r, "pool_key", "shop\n"), "pool_key"),  # "$" would match before the newline
    (lambda r: setattr(r.blocks[1], "id", "item-1\n"), "blocks[1].id"),
    (lambda r: setattr(r.params, "max_new_tokens", 0), "params.max_new_tokens"),
    (lambda r: setattr(r.params, "max_new_tokens", 65), "params.max_new_tokens"),
    (lambda r: setattr(r.params, "mode", 7), "params.mode"),
    (lambda r: setattr(r.params.sampling, "temperature", math.nan), "params.sampling.temperature"),
    (lambda r: setattr(r.params.sampling, "top_p", 1.5), "params.sampling.top_p"),
    (lambda r: setattr(r.params.relaxed, "min_prob", -0.1), "params.relaxed.min_prob"),
    (lambda r: setattr(r.params.advanced, "decoding_length", 10_000), "params.advanced.decoding_length"),
    (lambda r: setattr(r.params.relaxed, "top_k", 0), "params.relaxed.top_k"),  # set: 0 is a value, not valid
    (lambda r: setattr(r.params.relaxed, "top_k", 65), "params.relaxed.top_k"),
    (lambda r: (setattr(r.params, "mode", common_pb2.VERIFICATION_MODE_RELAXED),
                setattr(r.params.sampling, "temperature", 0.7)), "params.mode"),
])
def test_invalid_requests_name_the_field(mutation, field):
    with pytest.raises(InvalidArgument) as err:
        validate_generate_request(mutate(mutation), LIMITS)
    assert str(err.value).startswith(field)
    assert err.value.field == field and err.value.reason == "INVALID_FIELD"


def test_zero_is_a_valid_min_prob_and_seed():
    validate_generate_request(mutate(lambda r: (setattr(r.params.relaxed, "min_prob", 0.0),
                                                setattr(r.params.sampling, "seed", 0))), LIMITS)


@pytest.mark.parametrize("mutation, field", [
    (lambda r: r.blocks.extend([r.blocks[0]] * 3), "blocks"),
    (lambda r: setattr(r.blocks[0], "text", "x" * 101), "blocks[0].text"),
    (lambda r: [setattr(b, "text", "x" * 90) for b in r.blocks] and r.blocks.append(r.blocks[0]), "blocks"),
])
def test_oversized_requests_are_resource_exhausted(mutation, field):
    with pytest.raises(ResourceExhausted) as err:
        validate_generate_request(mutate(mutation), LIMITS)
    assert str(err.value).startswith(field)
    assert (err.value.field, err.value.reason) == (field, "FIELD_TOO_LARGE")
    assert err.value.limit in (LIMITS.max_blocks, LIMITS.max_block_chars, LIMITS.max_prompt_chars)


def test_blocks_tokenize_alone_and_spans_cover_the_prompt():
    from common.modeling.tiny import byte_tokenizer
    from common.prompt_tokens import PromptTooLong, tokenize_blocks

    tokenizer = byte_tokenizer()
    prompt = tokenize_blocks(tokenizer, ["Write.\n", "Item A.\n", "Why?"])
    assert prompt.spans == [(0, 7), (7, 15), (15, 19)]
    assert tokenizer.decode(prompt.token_ids) == "Write.\nItem A.\nWhy?"
    # The same block has the same tokens at any position.
    moved = tokenize_blocks(tokenizer, ["Item A.\n", "Write.\n"])
    assert moved.token_ids[:8] == prompt.token_ids[7:15]
    with pytest.raises(PromptTooLong):
        tokenize_blocks(tokenizer, ["x" * 50], max_tokens=10)
