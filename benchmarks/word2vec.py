"""Word2Vec: our training vs gensim 4 on the same corpus, hyperparameters and threads.

    python benchmarks/word2vec.py [--max-words 1000000] [--threads 1] [--runs sg-ns,cbow-ns,sg-hs]

One run of each: words/s (raw corpus words x epochs / wall time, vocabulary building
included for both), then WordSim-353 Spearman and Google-analogy accuracy of both models,
evaluated by the same code (`llm_jax.eval.word_vectors`). gensim is the optional `bench`
extra (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(SHARED / "english-dict-corpus.txt"))
    p.add_argument("--max-words", type=int, default=0, help="first N words only (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="sg-ns,cbow-ns,sg-hs")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--wordsim", default=str(SHARED / "wordsim353.tsv"))
    p.add_argument("--analogies", default=str(SHARED / "word-analogies.txt"))
    return p.parse_args()


def _slice(corpus: str, max_words: int) -> str:
    if not max_words:
        return corpus
    out = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    n = 0
    with open(corpus, encoding="utf-8", errors="replace") as f:
        for line in f:
            if n >= max_words:
                break
            out.write(line)
            n += len(line.split())
    out.close()
    return out.name


def main() -> int:
    args = _parse()
    if args.threads == 1:  # before JAX starts: XLA's CPU thread pool to one thread
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            " intra_op_parallelism_threads=1"
        )
    try:
        from gensim.models import Word2Vec as GensimW2V
    except ImportError:
        print("gensim is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    import numpy as np

    from llm_jax.eval.word_vectors import WordVectors, analogies, wordsim
    from llm_jax.models.word2vec import Word2VecConfig, read_sentences, train

    corpus = _slice(args.corpus, args.max_words)
    words = sum(len(s) for s in read_sentences([corpus], 10_000))
    print(f"corpus {corpus}: {words:,} words, {args.epochs} epochs, {args.threads} thread(s)")
    rows = []
    for run in args.runs.split(","):
        model, loss = run.split("-")
        cfg = Word2VecConfig(model=model, loss=loss, epochs=args.epochs)
        t = time.perf_counter()
        ours = train(cfg, [corpus]).word_vectors()
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        g = GensimW2V(
            corpus_file=corpus,
            vector_size=cfg.dim,
            window=cfg.window,
            min_count=cfg.min_count,
            sample=cfg.sample,
            sg=int(model == "sg"),
            hs=int(loss == "hs"),
            negative=cfg.negative if loss == "ns" else 0,
            alpha=cfg.alpha,
            min_alpha=cfg.min_alpha,
            epochs=cfg.epochs,
            workers=args.threads,
            seed=cfg.seed,
        )
        t_gensim = time.perf_counter() - t
        theirs = WordVectors(tuple(g.wv.index_to_key), np.asarray(g.wv.vectors, np.float32))
        for name, wv, secs in (("ours", ours, t_ours), ("gensim", theirs, t_gensim)):
            ws = wordsim(wv, args.wordsim)
            an = analogies(wv, args.analogies)["total"]
            rows.append((run, name, words * args.epochs / secs, ws, an))
            print(
                f"{run:8s} {name:7s} {words * args.epochs / secs:>10,.0f} w/s  "
                f"wordsim {ws['spearman']:.3f} (oov {ws['oov']:.0%})  "
                f"3CosAdd {an['3cosadd']:.1%} 3CosMul {an['3cosmul']:.1%} (oov {an['oov']:.0%})",
                flush=True,
            )
    print("\n| run | model | words/s | WordSim ρ | 3CosAdd | 3CosMul |")
    print("|---|---|---:|---:|---:|---:|")
    for run, name, wps, ws, an in rows:
        print(
            f"| {run} | {name} | {wps:,.0f} | {ws['spearman']:.3f} | {an['3cosadd']:.1%} | "
            f"{an['3cosmul']:.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
