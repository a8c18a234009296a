"""Packed CLM batches per second and tokens per second on bible-kjv.txt, tokenization cached.

    python benchmarks/data_pipeline.py [--corpus PATH] [--seconds 3] [--workdir DIR]

The first run trains a tokenizer and tokenizes the corpus (both reported, both cached in
--workdir); the measured steady state is the iterator after that: grain's seeded shuffle,
host slicing, packing gather and the CLM builder, then optionally
`jax.make_array_from_process_local_data` onto a one-axis mesh of the local devices.
Target: >= 1,000,000 tokens/s on a 2-core machine (the pipeline must not be what the
training step waits on).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from llm_jax.data import DataConfig, build_tokenizer, make_iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "bible-kjv.txt"


def measure(it, seconds: float) -> tuple[int, float, float]:
    """(batches, elapsed seconds, fraction of real tokens) for at least `seconds`."""
    batch = next(it)  # warm-up: first grain read, first device transfer
    jax.block_until_ready(batch)
    n, real = 0, 0.0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = next(it)
        jax.block_until_ready(batch)
        real += float(np.mean(np.asarray(batch["segment_ids"]) > 0))
        n += 1
    return n, elapsed, real / max(n, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_data"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    base = DataConfig(
        paths=(args.corpus,),
        doc_split="line",
        tokenizer_path=str(work / "tokenizer"),
        tokenizer_type="unigram",
        vocab_size=args.vocab_size,
        cache_dir=str(work / "cache"),
        objective="clm",
    )
    t = time.perf_counter()
    tok = build_tokenizer(base)
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    it = make_iterator(base, tok)  # tokenizes on the first run, loads the cache afterwards
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    it = make_iterator(base, tok)
    t_cached = time.perf_counter() - t
    corpus_tokens = len(it.source.stream)
    print(f"corpus {args.corpus}: {corpus_tokens:,} tokens (vocab {tok.vocab_size})")
    print(
        f"tokenizer load/train {t_tok:.2f} s; iterator build {t_first:.2f} s first, "
        f"{t_cached:.2f} s with the token cache"
    )
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    rows = []
    for T, B, workers, on_mesh in [
        (1024, 8, 0, False),
        (1024, 32, 0, False),
        (2048, 16, 0, False),
        (1024, 32, 1, False),
        (1024, 32, 0, True),
    ]:
        cfg = base.replace(seq_len=T, batch_size=B, num_workers=workers)
        it = make_iterator(cfg, tok, mesh=mesh if on_mesh else None)
        n, elapsed, real = measure(it, args.seconds)
        rows.append((T, B, workers, "mesh" if on_mesh else "numpy", n / elapsed, real))
    print()
    print(f"{'T':>5} {'B':>4} {'threads':>7} {'output':>6} {'batches/s':>10} {'tokens/s':>12} "
          f"{'real tok/s':>12} {'packed':>7}")  # fmt: skip
    for T, B, workers, out, bps, real in rows:
        print(
            f"{T:>5} {B:>4} {workers:>7} {out:>6} {bps:>10,.1f} {bps * B * T:>12,.0f} "
            f"{bps * B * T * real:>12,.0f} {real:>7.1%}"
        )
    print("\ntokens/s counts B*T per batch; 'real' excludes padding ('packed' = non-pad share).")


if __name__ == "__main__":
    main()
