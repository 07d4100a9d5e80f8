"""adaccel-client: send one request to the adaccel Router and stream the answer.

    adaccel-client --router router.example:50051 --ca-file ca.pem --token-file token \\
        --pool-key electronics/audio \\
        --block instruction:instr-1:"Write the selling points of this item." \\
        --block item:item-42:"Aurora headphones, wireless." --max-new-tokens 48

The text streams to stdout, a summary line to stderr; --json prints the summary as one JSON
object on stdout instead. `adaccel-client info --router ...` describes the router and its
decoder replicas. Exit status: 0 done, 1 the call failed (code, message and the server's
details on stderr), 2 bad arguments or unreadable files.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from adaccel_client.client import DEFAULT_TIMEOUT_S, AdaccelClient
from adaccel_client.errors import AdaccelError
from adaccel_client.retry import RetryPolicy
from adaccel_client.types import Advanced, Block, BlockKind, Relaxed, Sampling, Summary

KINDS = [kind.value for kind in BlockKind]


def parse_block(spec: str) -> Block:
    """KIND:ID:TEXT (TEXT may hold colons); TEXT gets a trailing newline, as the blocks of a
    prompt are concatenated as they are."""
    kind, sep, rest = spec.partition(":")
    block_id, sep2, text = rest.partition(":")
    if not sep or not sep2 or kind not in KINDS:
        raise argparse.ArgumentTypeError(f"--block must be KIND:ID:TEXT with KIND in {KINDS}, got {spec!r}")
    return Block(kind, block_id, text + "\n")


def _connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--router", required=True, help="router host:port")
    group.add_argument("--ca-file", help="CA certificate (PEM) that signed the router's: turns TLS on")
    group.add_argument("--tls", action="store_true", help="TLS with the system's CAs (no --ca-file)")
    group.add_argument("--server-name", help="name the router's certificate must carry (default: the host)")
    group.add_argument("--client-cert", help="this client's certificate (PEM), for mutual TLS")
    group.add_argument("--client-key", help="the private key (PEM) of --client-cert")
    group.add_argument("--token-file", help="file holding the bearer token (its first non-comment line)")
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help="deadline in seconds, all attempts together (default %(default)s)")
    group.add_argument("--retries", type=int, default=3,
                       help="retries on RESOURCE_EXHAUSTED / UNAVAILABLE before any output "
                       "(default %(default)s)")
    group.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _generate_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_args(parser)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--block", type=parse_block, action="append", required=True, metavar="KIND:ID:TEXT",
                     help=f"a prompt block, in order (KIND: {', '.join(KINDS)}); repeat for more")
    gen.add_argument("--pool-key", default="", help="draft pool, e.g. vertical/category (default: global)")
    gen.add_argument("--task", default="", help="what the prompt asks for, e.g. generative_rec: its task pool is drafted from too")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--mode", choices=["strict", "relaxed"], default="strict", help="draft verification")
    gen.add_argument("--relaxed-top-k", type=int, help="relaxed: accept drafts among the top k (default 2)")
    gen.add_argument("--relaxed-min-prob", type=float, help="relaxed: ... with at least this probability")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, help="sampling seed (default: derived from the request id)")
    gen.add_argument("--request-id", default="")
    gen.add_argument("--publish", action="store_true", help="publish the result to the generated-text topic")
    gen.add_argument("--raw-prompt", action="store_true", help="the block texts without the chat template")
    adv = parser.add_argument_group("advanced (benchmarks and operators only)")
    adv.add_argument("--no-drafting", action="store_true", help="plain decoding, one token per step")
    adv.add_argument("--no-block-reuse", action="store_true", help="prefill the whole prompt")
    adv.add_argument("--decoding-length", type=int, default=0, help="draft tokens per step at most")
    adv.add_argument("--branch-length", type=int, default=0, help="draft branch depth at most")
    return parser


def _info_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{prog} info",
                                     description="Describe the router and its decoder replicas.")
    _connection_args(parser)
    return parser


def _client(args: argparse.Namespace) -> AdaccelClient:
    if args.retries < 0:
        raise ValueError("--retries: must not be negative")
    return AdaccelClient(args.router, ca_file=args.ca_file, tls=True if args.tls else None,
                         server_name=args.server_name, client_cert_file=args.client_cert,
                         client_key_file=args.client_key, token_file=args.token_file, timeout=args.timeout,
                         retry=RetryPolicy(max_retries=args.retries))


def _summary_line(summary: Summary, attempts: int) -> str:
    s = summary.stats
    line = (f"-- {summary.request_id} on {summary.decoder_id}: {s.new_tokens} tokens in {s.steps} steps "
            f"({s.mean_accepted_per_step:.2f}/step), TTFT {s.ttft_s * 1000:.1f} ms, "
            f"total {s.total_s * 1000:.1f} ms")
    return line + (f" ({attempts} attempts)" if attempts > 1 else "")


def _generate(client: AdaccelClient, args: argparse.Namespace) -> int:
    relaxed = None
    if args.relaxed_top_k is not None or args.relaxed_min_prob is not None:
        if args.mode != "relaxed":
            raise ValueError("--relaxed-top-k / --relaxed-min-prob need --mode relaxed")
        relaxed = Relaxed(top_k=args.relaxed_top_k, min_prob=args.relaxed_min_prob)
    advanced = Advanced(disable_drafting=args.no_drafting, decoding_length=args.decoding_length,
                        branch_length=args.branch_length, disable_block_reuse=args.no_block_reuse)
    generation = client.generate(
        args.block, pool_key=args.pool_key, task=args.task, max_new_tokens=args.max_new_tokens, mode=args.mode,
        relaxed=relaxed, advanced=advanced if advanced != Advanced() else None,
        sampling=Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed),
        request_id=args.request_id, publish=args.publish, raw_prompt=args.raw_prompt)
    with generation:
        if args.json:
            summary = generation.summary
            print(json.dumps(dict(summary.to_dict(), attempts=generation.attempts), indent=2))
            return 0
        for delta in generation:
            print(delta.text, end="", flush=True)
        # stdout holds exactly the text; the newline that ends it on a terminal goes with the summary.
        print("\n" + _summary_line(generation.summary, generation.attempts), file=sys.stderr)
    return 0


def _info(client: AdaccelClient, args: argparse.Namespace) -> int:
    info = client.info()
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    print(f"policy: {info.policy}")
    for r in info.replicas:
        state = "healthy" if r.healthy else "UNHEALTHY"
        print(f"{r.address}  {state}  {r.decoder_id or '-'}  queue {r.queue_depth}  tokens in flight "
              f"{r.tokens_in_flight}  blocks {r.held_blocks}  pools {len(r.pool_keys)}")
    return 0


def _error_dict(exc: AdaccelError) -> dict[str, Any]:
    return {"code": exc.code.name, "message": exc.message, "reason": exc.reason, "domain": exc.domain,
            "metadata": dict(exc.metadata), "retry_delay_s": exc.retry_delay_s, "attempts": exc.attempts,
            "output_started": exc.output_started, "field_violations": [
                {"field": v.field, "description": v.description} for v in exc.field_violations]}


def _report(exc: AdaccelError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": _error_dict(exc)}, indent=2))
    lines = [f"error: {exc}"]
    if exc.reason:
        lines.append(f"  reason: {exc.reason}" + (f" ({exc.domain})" if exc.domain else ""))
    lines += [f"  field {v.field}: {v.description}" for v in exc.field_violations]
    if exc.retry_delay_s is not None:
        lines.append(f"  retry after: {exc.retry_delay_s:.3f} s")
    if exc.attempts > 1:
        lines.append(f"  attempts: {exc.attempts}")
    if exc.output_started:
        lines.append("  the output above is incomplete and void: the stream failed after it started "
                     "(not retried, it would repeat tokens); retry the whole request")
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "adaccel-client") -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command = args_in.pop(0) if args_in and args_in[0] in ("generate", "info") else "generate"
    parser = _info_parser(prog) if command == "info" else _generate_parser(prog)
    args = parser.parse_args(args_in)
    try:
        client = _client(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            return _info(client, args) if command == "info" else _generate(client, args)
    except AdaccelError as exc:
        sys.stdout.flush()
        if not args.json and exc.output_started:
            print(file=sys.stderr)
        _report(exc, args.json)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
