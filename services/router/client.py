"""python -m services.router.client: send one request to the router and stream the answer.

    python -m services.router.client --router 127.0.0.1:50051 --pool-key electronics/audio \\
        --block instruction:instr-1:"Write the selling points of this item." \\
        --block item:item-42:"Aurora headphones, wireless." --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import sys

import grpc

from adaccel.v1 import common_pb2, router_pb2_grpc
from common.rpc.channels import open_channel

KINDS = {
    "instruction": common_pb2.BLOCK_KIND_INSTRUCTION,
    "user_history": common_pb2.BLOCK_KIND_USER_HISTORY,
    "item": common_pb2.BLOCK_KIND_ITEM,
    "text": common_pb2.BLOCK_KIND_TEXT,
}


def parse_block(spec: str) -> common_pb2.PromptBlock:
    kind, sep, rest = spec.partition(":")
    block_id, sep2, text = rest.partition(":")
    if not sep or not sep2 or kind not in KINDS:
        raise argparse.ArgumentTypeError(f"--block must be KIND:ID:TEXT with KIND in {sorted(KINDS)}, got {spec!r}")
    return common_pb2.PromptBlock(id=block_id, kind=KINDS[kind], text=text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.router.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", required=True, help="router host:port")
    parser.add_argument("--block", type=parse_block, action="append", required=True, help="KIND:ID:TEXT")
    parser.add_argument("--pool-key", default="")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--mode", choices=["strict", "relaxed"], default="strict")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-drafting", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    request = common_pb2.GenerateRequest(
        pool_key=args.pool_key, blocks=args.block,
        params=common_pb2.GenerationParams(
            max_new_tokens=args.max_new_tokens, disable_drafting=args.no_drafting,
            mode=common_pb2.VERIFICATION_MODE_RELAXED if args.mode == "relaxed" else common_pb2.VERIFICATION_MODE_STRICT,
            sampling=common_pb2.SamplingParams(temperature=args.temperature)),
    )
    stub = router_pb2_grpc.RouterStub(open_channel(args.router))
    try:
        for chunk in stub.Generate(request, timeout=args.timeout):
            if chunk.HasField("delta"):
                print(chunk.delta.text, end="", flush=True)
            else:
                s = chunk.summary.stats
                print(f"\n-- {chunk.summary.request_id} on {chunk.summary.decoder_id}: {s.new_tokens} tokens in "
                      f"{s.steps} steps ({s.mean_accepted_per_step:.2f}/step), TTFT {s.ttft_s * 1000:.1f} ms, "
                      f"total {s.total_s * 1000:.1f} ms", file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
