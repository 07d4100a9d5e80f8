"""make bench-block-transfer: fetching a block's KV from the kv-store against recomputing it, by
block length and dtype, on the real model.

A real kv-store server (RocksDB under a temporary directory) on loopback; blocks of the given
lengths (token ids from the workload's item blocks, repeated to length) are computed on the model,
stored in float32 and in bfloat16, and fetched back the way a decoder does (KvStoreClient: Contains,
then a streamed Get, then decode_block's checks). Reported per length: bytes, recompute time
(compute_block_kv, standalone), fetch time, and their ratio; and how far a bfloat16 round trip
moves the KV (relative L2 error of keys and values).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from tqdm import tqdm

from bench.common import (
    add_model_arguments,
    bench_parser,
    figure,
    parse_model_bench_args,
    quick_run,
    results_table,
    save_figure,
    spread,
    write_results,
)
from common.blocks.assembly import BlockKV, compute_block_kv
from common.blocks.hashing import BlockKind, block_hash, tokenizer_fingerprint
from common.blocks.kv_codec import decode_block, encode_block
from common.blocks.placement import Placement
from common.machine import device_name
from common.modeling.loading import load_model
from common.rpc.channels import open_channel
from common.telemetry import null_telemetry
from common.workload.export import load_prompts
from services.decoder.block_cache import KvStoreClient, WantedBlock
from services.kvstore.server import create_kvstore_server
from services.kvstore.settings import KvStoreSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def block_tokens(tokenizer, prompts, length: int) -> list[int]:
    """`length` token ids of item-block text (the workload's item blocks, joined and cut)."""
    ids: list[int] = []
    for prompt in prompts:
        for block in prompt.blocks:
            if block.kind == "item":
                ids.extend(tokenizer(block.text, add_special_tokens=False)["input_ids"])
                if len(ids) >= length:
                    return ids[:length]
    raise ValueError(f"the workload's item blocks hold fewer than {length} tokens")


def relative_error(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    num = sum(float((x.float() - y.float()).norm() ** 2) for x, y in zip(a, b, strict=True))
    den = sum(float(y.float().norm() ** 2) for y in b)
    return (num / den) ** 0.5


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model_path, device="cpu", dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts, _ = load_prompts(args.workload)
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    compute_block_kv(model, block_tokens(tokenizer, prompts, 32))  # warm-up: the first forward pays for set-up
    rows = []
    with tempfile.TemporaryDirectory(prefix="block-transfer-") as tmp:
        handle = create_kvstore_server(KvStoreSettings(data_dir=Path(tmp)), null_telemetry())
        channel = open_channel(handle.address)
        client = KvStoreClient(Placement([handle.address]), {handle.address: channel}, timeout_s=30.0,
                               down_backoff_s=1.0)
        try:
            with tqdm(total=len(args.lengths) * args.repeats, desc="block lengths x repeats", unit="run") as bar:
                for length in args.lengths:
                    ids = block_tokens(tokenizer, prompts, length)
                    compute_s, fetch_s = [], {name: [] for name in DTYPES}
                    row = {"tokens": length}
                    for repeat in range(args.repeats):
                        start = time.perf_counter()
                        kv = compute_block_kv(model, ids)
                        compute_s.append(time.perf_counter() - start)
                        for name, dtype in DTYPES.items():
                            model_id = f"{loaded.blocks_model_id}/{name}"
                            hash_ = block_hash(model_id=model_id, tokenizer_fp=tokenizer_fp,
                                               kind=BlockKind.ITEM, token_ids=ids)
                            stored = BlockKV(keys=tuple(k.to(dtype) for k in kv.keys),
                                              values=tuple(v.to(dtype) for v in kv.values))
                            header, data = encode_block(stored, hash_=hash_, model_id=model_id)
                            wanted = WantedBlock(hash_, BlockKind.ITEM, "")
                            if repeat == 0:
                                client.put(wanted, header, data, chunk_bytes=1 << 20)
                                row[f"{name}_bytes"] = len(data)
                            start = time.perf_counter()
                            found = client.fetch(model_id, [wanted])
                            got = decode_block(*found[hash_], hash_=hash_, model_id=model_id,
                                               expected_shape=header.shape, dtype=dtype, device=model.device)
                            fetch_s[name].append(time.perf_counter() - start)
                            if repeat == 0 and name != "float32":
                                row[f"{name}_key_error"] = relative_error(got.keys, kv.keys)
                                row[f"{name}_value_error"] = relative_error(got.values, kv.values)
                        bar.update(1)
                    row["recompute_s"] = statistics.median(compute_s)
                    row["recompute_spread_s"] = spread(compute_s)
                    for name in DTYPES:
                        row[f"{name}_fetch_s"] = statistics.median(fetch_s[name])
                        row[f"{name}_fetch_spread_s"] = spread(fetch_s[name])
                        row[f"{name}_recompute_over_fetch"] = row["recompute_s"] / row[f"{name}_fetch_s"]
                    rows.append(row)
        finally:
            client.close()
            channel.close()
            handle.stop(0)
    report = {"device": device_name(), "model": loaded.model_id, "model_path": str(args.model_path),
              "repeats": args.repeats, "kv_bytes_per_token_float32": rows[0]["float32_bytes"] // rows[0]["tokens"],
              "results": rows}
    console = Console(width=150)
    table = results_table(f"block transfer vs recompute: {report['model']} on {report['device']}, kv-store on "
                          "loopback (median of repeats)",
                          ("tokens", "MB fp32", "recompute ms", "fetch fp32 ms", "x", "fetch bf16 ms", "x",
                           "bf16 K / V error"))
    for r in rows:
        table.add_row(str(r["tokens"]), f"{r['float32_bytes'] / 1e6:.1f}", f"{r['recompute_s'] * 1000:.1f}",
                      f"{r['float32_fetch_s'] * 1000:.1f}", f"{r['float32_recompute_over_fetch']:.2f}",
                      f"{r['bfloat16_fetch_s'] * 1000:.1f}", f"{r['bfloat16_recompute_over_fetch']:.2f}",
                      f"{r['bfloat16_key_error']:.4f} / {r['bfloat16_value_error']:.4f}")
    console.print(table)
    path = write_results("block_transfer.json", report, args.results_dir)
    fig, ax = figure()
    lengths = [r["tokens"] for r in rows]
    ax.plot(lengths, [r["recompute_s"] * 1000 for r in rows], "o-", label="recompute (fp32)")
    for name in DTYPES:
        ax.plot(lengths, [r[f"{name}_fetch_s"] * 1000 for r in rows], "o-", label=f"fetch from kv-store ({name})")
    ax.set(xscale="log", yscale="log", xlabel="block tokens", ylabel="ms", title=f"block transfer vs recompute, {report['model']}")
    ax.legend()
    save_figure(fig, args.results_dir / "block_transfer.png")
    console.print(f"wrote {path} and block_transfer.png")
    return report


def parse_args(argv: list[str] | None = None):
    quick = quick_run()
    parser = bench_parser("bench.block_transfer", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=2 if quick else 5)
    return parse_model_bench_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
