"""Word2Vec: our training vs gensim 4 on the same corpus, hyperparameters and threads.

    python benchmarks/word2vec.py [--max-words 1000000] [--threads 1] [--runs sg-ns,cbow-ns,sg-hs]

One run of each: words/s (raw corpus words x epochs / wall time, vocabulary building
included for both; also per CPU-second of the process, steadier on a shared machine),
then WordSim-353 Spearman and Google-analogy accuracy of both models,
evaluated by the same code (`llm_jax.eval.word_vectors`). gensim is the optional `bench`
extra (`pip install -e ".[bench]"`).

Threads: --threads 1 gives XLA one compute thread and gensim one worker. JAX dispatches
asynchronously, so our NumPy example building (the Python thread) overlaps the XLA thread:
the CPU-second rate counts both.
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


def _table(rows) -> None:
    """Both sides of every number and ours/gensim (speed) or ours - gensim (quality)."""
    print(
        "\n| run | words/s ours | words/s gensim | ratio | w/CPU-s ratio | WordSim ρ ours "
        "| gensim | Δ | 3CosAdd ours | gensim | Δ pts | 3CosMul ours | gensim | Δ pts |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run, r in rows:
        (wo, wso, ano, co), (wg, wsg, ang, cg) = r["ours"], r["gensim"]
        cells = [f"{wo:,.0f}", f"{wg:,.0f}", f"{wo / wg:.2f}x", f"{co / cg:.2f}x"]
        cells += [f"{wso['spearman']:.3f}", f"{wsg['spearman']:.3f}"]
        cells += [f"{wso['spearman'] - wsg['spearman']:+.3f}"]
        for m in ("3cosadd", "3cosmul"):
            cells += [f"{ano[m]:.1%}", f"{ang[m]:.1%}", f"{100 * (ano[m] - ang[m]):+.1f}"]
        print(f"| {run} | " + " | ".join(cells) + " |")


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
        t, c = time.perf_counter(), time.process_time()
        ours = train(cfg, [corpus]).word_vectors()
        t_ours, c_ours = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
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
        t_gensim, c_gensim = time.perf_counter() - t, time.process_time() - c
        theirs = WordVectors(tuple(g.wv.index_to_key), np.asarray(g.wv.vectors, np.float32))
        result = {}
        for name, wv, secs, cpu in (
            ("ours", ours, t_ours, c_ours),
            ("gensim", theirs, t_gensim, c_gensim),
        ):
            ws = wordsim(wv, args.wordsim)
            an = analogies(wv, args.analogies)["total"]
            result[name] = (words * args.epochs / secs, ws, an, words * args.epochs / cpu)
            print(
                f"{run:8s} {name:7s} {words * args.epochs / secs:>10,.0f} w/s "
                f"({words * args.epochs / cpu:,.0f} w/CPU-s)  "
                f"wordsim {ws['spearman']:.3f} (oov {ws['oov']:.0%})  "
                f"3CosAdd {an['3cosadd']:.1%} 3CosMul {an['3cosmul']:.1%} (oov {an['oov']:.0%})",
                flush=True,
            )
        rows.append((run, result))
    _table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
