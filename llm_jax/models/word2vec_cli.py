"""`llm-jax word2vec`: train (vectors.txt, vectors.bin, checkpoint/), eval (WordSim-353,
Google analogies), neighbours and analogy queries."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from llm_jax.models.word2vec import Word2VecConfig, train

    cfg = Word2VecConfig(
        model=args.model,
        loss=args.loss,
        dim=args.dim,
        window=args.window,
        negative=args.negative,
        min_count=args.min_count,
        sample=args.sample,
        epochs=args.epochs,
        alpha=args.alpha,
        min_alpha=args.min_alpha,
        seed=args.seed,
    )
    for path in args.input:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no corpus file {path}")
    start = time.perf_counter()
    bar = tqdm(total=None, unit="w", unit_scale=True, disable=args.quiet)

    def on_step(p) -> None:
        if bar.total is None:
            bar.total = p.words_total
        bar.update(p.words_done - bar.n)
        rate = p.words_done / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(
            epoch=p.epoch + 1, loss=f"{p.loss:.3f}", lr=f"{p.lr:.5f}", wps=f"{rate:,.0f}"
        )

    mesh = None
    if args.shard:
        from llm_jax.parallel import make_mesh

        mesh = make_mesh()
    model = train(
        cfg,
        args.input,
        on_step=on_step,
        workdir=args.out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        mesh=mesh,
        tensorboard=args.tensorboard,
    )
    bar.close()
    out = model.save(args.out)
    secs = time.perf_counter() - start
    print(
        f"{len(model.vocab):,} words x {cfg.dim} in {secs:.1f}s; wrote {out}/vectors.txt, "
        f"{out}/vectors.bin, {out}/checkpoint/ and {out}/metrics.jsonl"
    )
    return 0


def _vectors(path: str):
    from llm_jax.eval.word_vectors import load_word2vec

    p = Path(path)
    if p.is_dir():
        p = p / "vectors.bin"
    return load_word2vec(p)


def _eval(args: argparse.Namespace) -> int:
    from llm_jax.eval.word_vectors import analogies, wordsim

    wv = _vectors(args.vectors)
    ws = wordsim(wv, args.wordsim)
    an = analogies(wv, args.analogies, restrict_vocab=args.restrict_vocab)
    print(f"WordSim-353 Spearman {ws['spearman']:.4f} ({ws['oov']:.1%} of pairs out of vocabulary)")
    print(f"{'section':30s} {'3CosAdd':>8s} {'3CosMul':>8s} {'questions':>9s} {'OOV':>6s}")
    for name, r in an.items():
        add, mul = (
            f"{r[m]:8.2%}" if r[m] == r[m] else f"{'-':>8s}" for m in ("3cosadd", "3cosmul")
        )
        print(f"{name:30s} {add} {mul} {r['questions']:9d} {r['oov']:6.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"wordsim": ws, "analogies": an}, indent=2))
    return 0


def _query(wv, positive: list[str], negative: list[str], topn: int) -> int:
    missing = wv.missing([*positive, *negative])
    if missing:
        print(f"not in the vocabulary ({len(wv.words):,} words): {', '.join(missing)}")
        return 1
    for word, sim in wv.nearest(positive, negative, topn=topn):
        print(f"{sim:.4f}  {word}")
    return 0


def _neighbours(args: argparse.Namespace) -> int:
    wv = _vectors(args.vectors)
    rc = 0
    for word in args.words:
        print(f"# {word}")
        rc = max(rc, _query(wv, [word], [], args.topn))
    return rc


def _analogy(args: argparse.Namespace) -> int:
    print(f"# {args.a} : {args.b} :: {args.c} : ?")
    return _query(_vectors(args.vectors), [args.b, args.c], [args.a], args.topn)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("word2vec", help="train and evaluate Word2Vec (skip-gram / CBOW)")
    wsub = p.add_subparsers(dest="word2vec_command", required=True)
    t = wsub.add_parser("train", help="train on text files; writes vectors.txt/.bin + checkpoint")
    t.add_argument("--input", nargs="+", required=True, help="text files, one sentence a line")
    t.add_argument("--model", choices=["sg", "cbow"], default="sg")
    t.add_argument("--loss", choices=["ns", "hs"], default="ns")
    t.add_argument("--dim", type=int, default=100)
    t.add_argument("--window", type=int, default=5)
    t.add_argument("--negative", type=int, default=5)
    t.add_argument("--min-count", type=int, default=5)
    t.add_argument("--sample", type=float, default=1e-3)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--alpha", type=float, default=0.025)
    t.add_argument("--min-alpha", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="checkpoint every N chunks of 200k corpus positions into OUT/checkpoints (0: none)",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoints' latest good step"
    )
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write OUT/tensorboard/ and OUT/loss_curve.png (OUT/metrics.jsonl always)",
    )
    t.add_argument(
        "--shard", action="store_true", help="split the tables' rows over all devices (a mesh)"
    )
    t.add_argument("--out", required=True)
    t.set_defaults(func=_train)
    e = wsub.add_parser("eval", help="WordSim-353 Spearman and analogy accuracy")
    e.add_argument("vectors", help="vectors.txt / vectors.bin, or a training --out folder")
    e.add_argument("--wordsim", default=str(_DATA / "wordsim353.tsv"))
    e.add_argument("--analogies", default=str(_DATA / "word-analogies.txt"))
    e.add_argument("--restrict-vocab", type=int, default=300_000)
    e.add_argument("--json", help="also write the results here")
    e.set_defaults(func=_eval)
    n = wsub.add_parser("neighbours", help="nearest words by cosine")
    n.add_argument("vectors")
    n.add_argument("words", nargs="+")
    n.add_argument("--topn", type=int, default=10)
    n.set_defaults(func=_neighbours)
    a = wsub.add_parser("analogy", help="a : b :: c : ? (3CosAdd)")
    a.add_argument("vectors")
    a.add_argument("a")
    a.add_argument("b")
    a.add_argument("c")
    a.add_argument("--topn", type=int, default=5)
    a.set_defaults(func=_analogy)
