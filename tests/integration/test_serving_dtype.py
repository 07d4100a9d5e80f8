"""The dtype setting on real servers: a bfloat16 decoder serves, publishes its blocks in bfloat16
(half the bytes of float32), and a float32 decoder sharing the kv-store never takes them (block
KV is keyed by model and dtype, so two dtypes of one checkpoint cannot mix). Likewise two
checkpoints under one model_id (a fine-tune saved under the old name) never share blocks: the key
carries a fingerprint of the weights."""

from __future__ import annotations

import json

import pytest

from adaccel.v1 import decoder_pb2, decoder_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc
from common.modeling.tiny import save_tiny_model
from tests.integration.test_block_reuse import generate, request, start_decoder, start_kvstore, wait_for


@pytest.fixture
def kvstore(tmp_path):
    handle, store = start_kvstore(tmp_path)
    yield handle, store
    handle.stop(0)


def test_a_bfloat16_decoder_publishes_half_size_blocks_a_float32_one_never_reads(
        tmp_path, kvstore, tiny_llama_path, channel_to):
    kv_handle, _ = kvstore
    kv_stub = kvstore_pb2_grpc.KvStoreStub(channel_to(kv_handle.address))
    decoders = []
    try:
        bf16 = start_decoder(tmp_path, tiny_llama_path, kv_handle.address, "bf16", dtype="bfloat16")
        decoders.append(bf16)
        d_bf16 = decoder_pb2_grpc.DecoderStub(channel_to(bf16.address))
        summary = generate(d_bf16, request([0, 1]))
        assert summary.stats.new_tokens == 8
        wait_for(lambda: kv_stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_blocks == 3,
                 "the bfloat16 decoder's 3 blocks in the kv-store")
        bf16_bytes = kv_stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_bytes

        fp32 = start_decoder(tmp_path, tiny_llama_path, kv_handle.address, "fp32", dtype="float32")
        decoders.append(fp32)
        d_fp32 = decoder_pb2_grpc.DecoderStub(channel_to(fp32.address))
        cold = generate(d_fp32, request([0, 1]))
        assert cold.stats.cached_prompt_tokens == 0, "a float32 decoder used bfloat16 blocks"
        wait_for(lambda: kv_stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_blocks == 6,
                 "the float32 decoder's own 3 blocks beside them")
        fp32_bytes = kv_stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_bytes - bf16_bytes
        # Same blocks, half the element size (headers aside).
        assert 0.45 < bf16_bytes / fp32_bytes < 0.55, (bf16_bytes, fp32_bytes)
        # The bfloat16 decoder still reuses its own.
        warm = generate(d_bf16, request([1, 0], request_id="again"))
        assert warm.stats.cached_prompt_tokens > 0
        assert d_bf16.Info(decoder_pb2.DecoderInfoRequest(), timeout=5).model_id
    finally:
        for handle in decoders:
            handle.stop(0)


def test_a_different_checkpoint_under_the_same_model_id_never_reads_the_others_blocks(
        tmp_path, kvstore, tiny_llama_path, channel_to):
    kv_handle, _ = kvstore
    kv_stub = kvstore_pb2_grpc.KvStoreStub(channel_to(kv_handle.address))
    other = save_tiny_model(tmp_path / "retrained", "llama", seed=1)
    card_path = other / "adaccel_model.json"
    same_name = json.loads((tiny_llama_path / "adaccel_model.json").read_text())["model_id"]
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "model_id": same_name}))
    decoders = []
    try:
        first = start_decoder(tmp_path, tiny_llama_path, kv_handle.address, "first", dtype="float32")
        decoders.append(first)
        generate(decoder_pb2_grpc.DecoderStub(channel_to(first.address)), request([0, 1]))
        wait_for(lambda: kv_stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_blocks == 3,
                 "the first checkpoint's 3 blocks in the kv-store")

        second = start_decoder(tmp_path, other, kv_handle.address, "second", dtype="float32")
        decoders.append(second)
        d_second = decoder_pb2_grpc.DecoderStub(channel_to(second.address))
        assert d_second.Info(decoder_pb2.DecoderInfoRequest(), timeout=5).model_id == same_name
        cold = generate(d_second, request([0, 1]))
        assert cold.stats.cached_prompt_tokens == 0, "a different checkpoint used another's blocks"
        wait_for(lambda: kv_stub.Stats(kvstore_pb2.KvStatsRequest(), timeout=5).disk_blocks == 6,
                 "the second checkpoint's own 3 blocks beside them")
    finally:
        for handle in decoders:
            handle.stop(0)
