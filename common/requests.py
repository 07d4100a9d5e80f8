"""Validation of GenerateRequest at the edge (router) and again at the decoder.

One function, so both sides reject the same requests with the same messages; each message
names the field and the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adaccel.v1 import common_pb2
from common.rpc.errors import InvalidArgument, ResourceExhausted, require

# \Z, not $: "$" also matches before a trailing newline, which let "shop\n" through (found by fuzzing).
POOL_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.\-/]{0,128}\Z")
TASK_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{0,64}\Z")
BLOCK_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}\Z")


@dataclass(slots=True, frozen=True)
class RequestLimits:
    max_blocks: int = 256
    max_block_chars: int = 64_000
    max_prompt_chars: int = 256_000
    max_new_tokens: int = 512
    max_decoding_length: int = 128
    max_branch_length: int = 32


def validate_generate_request(req: common_pb2.GenerateRequest, limits: RequestLimits) -> None:
    require(len(req.request_id) <= 128, "request_id", "at most 128 characters")
    require(len(req.blocks) > 0, "blocks", "at least one prompt block is required")
    if len(req.blocks) > limits.max_blocks:
        raise ResourceExhausted(f"blocks: {len(req.blocks)} blocks, limit is {limits.max_blocks}",
                                field="blocks", limit=limits.max_blocks)
    total_chars = 0
    for i, block in enumerate(req.blocks):
        field = f"blocks[{i}]"
        require(block.kind != common_pb2.BLOCK_KIND_UNSPECIFIED and block.kind in common_pb2.BlockKind.values(),
                f"{field}.kind", "must be INSTRUCTION, USER_HISTORY, ITEM or TEXT")
        require(bool(BLOCK_ID_PATTERN.match(block.id)), f"{field}.id",
                "1-128 characters of letters, digits and _.:-/")
        require(len(block.text) > 0, f"{field}.text", "must not be empty")
        if len(block.text) > limits.max_block_chars:
            raise ResourceExhausted(
                f"{field}.text: {len(block.text)} characters, limit is {limits.max_block_chars}",
                field=f"{field}.text", limit=limits.max_block_chars)
        total_chars += len(block.text)
    if total_chars > limits.max_prompt_chars:
        raise ResourceExhausted(
            f"blocks: prompt of {total_chars} characters, limit is {limits.max_prompt_chars}",
            field="blocks", limit=limits.max_prompt_chars)
    require(bool(POOL_KEY_PATTERN.match(req.pool_key)), "pool_key",
            "at most 128 characters of letters, digits and _.-/")
    require(bool(TASK_PATTERN.match(req.task)), "task", "at most 64 characters of letters, digits and _.-")
    validate_params(req.params, limits)


def validate_params(params: common_pb2.GenerationParams, limits: RequestLimits) -> None:
    require(1 <= params.max_new_tokens <= limits.max_new_tokens, "params.max_new_tokens",
            f"must be in 1..{limits.max_new_tokens}, got {params.max_new_tokens}",
            limit=limits.max_new_tokens)
    require(params.mode in common_pb2.VerificationMode.values(), "params.mode", "unknown verification mode")
    advanced = params.advanced
    require(0 <= advanced.decoding_length <= limits.max_decoding_length, "params.advanced.decoding_length",
            f"must be in 0..{limits.max_decoding_length}", limit=limits.max_decoding_length)
    require(0 <= advanced.branch_length <= limits.max_branch_length, "params.advanced.branch_length",
            f"must be in 0..{limits.max_branch_length}", limit=limits.max_branch_length)
    relaxed = params.relaxed
    # optional fields: unset = the decoder's default (top_k 2, min_prob 0.1); a set 0 is a value,
    # valid for min_prob (any top-k token), not for top_k (no token could be accepted).
    require(not relaxed.HasField("top_k") or 1 <= relaxed.top_k <= 64, "params.relaxed.top_k",
            f"must be in 1..64 when set, got {relaxed.top_k}")
    require(0.0 <= relaxed.min_prob <= 1.0, "params.relaxed.min_prob", "must be in [0, 1]")
    sampling = params.sampling
    require(0.0 <= sampling.temperature <= 10.0, "params.sampling.temperature", "must be in [0, 10]")
    require(0.0 <= sampling.top_p <= 1.0, "params.sampling.top_p", "must be in [0, 1]")
    require(sampling.top_k >= 0, "params.sampling.top_k", "must be >= 0")
    if params.mode == common_pb2.VERIFICATION_MODE_RELAXED and sampling.temperature > 0:
        raise InvalidArgument("params.mode: relaxed verification is defined for greedy decoding only "
                              "(params.sampling.temperature must be 0)")


def block_ids_of_kind(req: common_pb2.GenerateRequest, kind: int) -> list[str]:
    return [b.id for b in req.blocks if b.kind == kind]
