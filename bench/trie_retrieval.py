"""Timing of token-trie retrieval on a large pool (a script, not a test).

Builds a pool of about --nodes nodes from synthetic "ads text" (documents stitched from a bank
of recurring phrases plus Zipf-distributed filler, so the trie has both deep repeated paths and
wide fan-out), then times one decode step's draft lookup:

- pool.retrieve: trie lookup + best-first selection + tree assembly (decoding_length 64,
  branch_length 12, 2-token key by default), keys taken from inserted text (hits) and random
  keys (mostly misses); on the freshly inserted pool (first lookups also sort the sibling
  lists they touch), again (warm), and on the pool loaded from a snapshot (what a decoder
  holds: all lists sorted at load);
- drafter.draft: what the engine calls per step (request overlay + pool, merged);
- snapshot to_bytes / from_bytes and a squeeze, for scale.

    PYTHONPATH=. .venv/bin/python -m bench.trie_retrieval --nodes 1000000
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

from common.drafting.pools import RequestDrafter
from common.drafting.trie import TokenTrie, TrieSettings


def synthetic_documents(rng: np.random.Generator, vocab: int, phrase_bank: int):
    """Endless documents: 60% recurring phrases (3-10 tokens), 40% Zipf filler tokens; token
    ranks are shuffled over the vocabulary."""
    shuffled = rng.permutation(vocab)

    def zipf_tokens(size: int) -> list[int]:
        return shuffled[(rng.zipf(1.1, size=size) - 1) % vocab].tolist()

    phrases = [zipf_tokens(int(rng.integers(3, 11))) for _ in range(phrase_bank)]
    phrase_weights = 1.0 / np.arange(1, phrase_bank + 1)
    phrase_weights /= phrase_weights.sum()
    while True:
        document: list[int] = []
        for _ in range(int(rng.integers(10, 40))):
            if rng.random() < 0.6:
                document += phrases[int(rng.choice(phrase_bank, p=phrase_weights))]
            else:
                document += zipf_tokens(int(rng.integers(1, 4)))
        yield document


def build_pool(nodes: int, vocab: int, seed: int,
               ngram_length: int) -> tuple[TokenTrie, list[list[int]], float]:
    rng = np.random.default_rng(seed)
    pool = TokenTrie(TrieSettings(ngram_length=ngram_length, capacity=max(nodes * 2, 1 << 20)))
    documents = []
    start = time.perf_counter()
    for document in synthetic_documents(rng, vocab, phrase_bank=5000):
        pool.insert(document)
        if len(documents) < 2000:
            documents.append(document)
        if len(pool) >= nodes:
            break
    return pool, documents, time.perf_counter() - start


def time_calls(function, arguments: list) -> tuple[list[float], list[float]]:
    """(wall, thread CPU) microseconds per call. On a shared machine the wall tail is mostly
    the scheduler; CPU time shows what the lookup itself costs."""
    wall, cpu = [], []
    for argument in arguments:
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        function(argument)
        cpu.append((time.thread_time() - start_cpu) * 1e6)
        wall.append((time.perf_counter() - start_wall) * 1e6)
    return wall, cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(name: str, timings: tuple[list[float], list[float]]) -> str:
    wall, cpu = timings
    return (
        f"{name:<44} CPU median {statistics.median(cpu):7.1f} us  p99 {percentile(cpu, 0.99):7.1f} us"
        f"  | wall median {statistics.median(wall):7.1f} us  p99 {percentile(wall, 0.99):7.1f} us"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--decoding-length", type=int, default=64)
    parser.add_argument("--branch-length", type=int, default=12)
    parser.add_argument("--key-length", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ngram_length = args.key_length + args.branch_length  # deep enough for the drafts timed
    pool, documents, build_s = build_pool(args.nodes, args.vocab, args.seed, ngram_length)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"pool: {len(pool):,} nodes built in {build_s:.1f} s; peak RSS +{(rss_after - rss_before) / 1024:.0f} MiB"
    )

    rng = np.random.default_rng(args.seed + 1)
    hit_contexts = []
    for _ in range(args.queries):
        document = documents[int(rng.integers(len(documents)))]
        end = int(rng.integers(args.key_length, len(document) + 1))
        hit_contexts.append(document[:end])
    random_contexts = [rng.integers(0, args.vocab, size=8).tolist() for _ in range(args.queries)]
    budget = dict(
        decoding_length=args.decoding_length, branch_length=args.branch_length, key_length=args.key_length
    )

    fresh_first = time_calls(lambda c: pool.retrieve(c, **budget), hit_contexts)
    fresh_again = time_calls(lambda c: pool.retrieve(c, **budget), hit_contexts)

    start = time.perf_counter()
    snapshot = pool.to_bytes()
    to_bytes_s = time.perf_counter() - start
    start = time.perf_counter()
    restored = TokenTrie.from_bytes(snapshot)
    from_bytes_s = time.perf_counter() - start
    assert len(restored) == len(pool)
    loaded_hits = time_calls(lambda c: restored.retrieve(c, **budget), hit_contexts)
    loaded_random = time_calls(lambda c: restored.retrieve(c, **budget), random_contexts)
    drafter = RequestDrafter(restored, hit_contexts[0][:200])
    step = time_calls(lambda c: drafter.draft(c, args.decoding_length, args.branch_length), hit_contexts)

    sizes = [len(restored.retrieve(c, **budget)) for c in hit_contexts[:500]]
    print(
        f"retrieval: decoding_length {args.decoding_length}, branch_length {args.branch_length}, "
        f"key {args.key_length}; mean draft size on hits {statistics.mean(sizes):.1f} tokens"
    )
    print(summary("inserted pool, keys from its text, 1st time", fresh_first))
    print(summary("inserted pool, same keys again", fresh_again))
    print(summary("snapshot-loaded pool, keys from its text", loaded_hits))
    print(summary("snapshot-loaded pool, random keys", loaded_random))
    print(summary("drafter.draft (overlay + pool, per step)", step))
    print(
        f"snapshot: {len(snapshot) / 2**20:.1f} MiB ({len(snapshot) / len(pool):.1f} B/node), "
        f"to_bytes {to_bytes_s:.2f} s, from_bytes {from_bytes_s:.2f} s"
    )
    start = time.perf_counter()
    restored.squeeze()
    print(f"squeeze: {len(pool):,} -> {len(restored):,} nodes in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
