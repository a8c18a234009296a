"""Sentiment fine-tuning figures: method x (trainable params, optimizer-state bytes, peak host
memory, s/step, dev and test accuracy), from our bert_tiny run and from a Hugging Face BERT
(all-MiniLM-L6-v2 when given), with a bag-of-words logistic-regression baseline beside.

    python benchmarks/finetune_sentiment.py --hf /path/to/all-MiniLM-L6-v2 --steps 150

Each method is one `llm-jax train configs/finetune_sentiment.yaml ...` subprocess (peak RSS
by /usr/bin/time); accuracy is computed afterwards from the restored checkpoint on the whole
dev and test files. Without `--base-run`, bert_tiny is pretrained first (configs/bert_tiny.yaml).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SPLITS = {s: DATA / f"sentiment-mr.{s}.txt" for s in ("train", "dev", "test")}
# (finetune overrides, learning rate for a small base, for a real pretrained base)
METHODS = {
    "full": (["finetune.method=full"], 3e-4, 5e-5),
    "top:2": (["finetune.method=full", "finetune.trainable=top:2"], 3e-4, 1e-4),
    "head": (["finetune.method=full", "finetune.trainable=head"], 3e-3, 3e-3),
    "prompt": (["finetune.method=prompt_tuning", "finetune.prompt_length=20"], 3e-2, 3e-2),
    "lora r=8": (["finetune.method=lora", "finetune.lora_rank=8"], 2e-3, 2e-3),
}


def run_method(workdir: Path, base: list[str], overrides: list[str], lr: float, steps: int) -> dict:
    cmd = [
        "/usr/bin/time", "-f", "maxrss_kb=%M",
        sys.executable, "-m", "llm_jax.cli", "train", str(ROOT / "configs/finetune_sentiment.yaml"),
        f"workdir={workdir}", *base, *overrides, f"optimizer.learning_rate={lr}",
        f"train.steps={steps}", "train.eval_every=0", f"train.checkpoint_every={steps}",
        "train.progress=false", "train.log_every=10",
        f"data.paths=[{SPLITS['train']}]", f"data.validation_paths=[{SPLITS['dev']}]",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    err = proc.stderr
    m = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+).*optimizer state: ([\d.]+) MiB", err)
    rates = [
        json.loads(line).get("train/steps_per_second")
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    rates = [r for r in rates if r][1:] or [r for r in rates if r]
    return {
        "trainable": int(m.group(1).replace(",", "")),
        "total": int(m.group(2).replace(",", "")),
        "opt_mib": float(m.group(3)),
        "peak_rss_gib": int(re.search(r"maxrss_kb=(\d+)", err).group(1)) / 2**20,
        "s_per_step": 1.0 / float(np.mean(rates)),
        "wall_s": time.perf_counter() - start,
    }


def accuracy(workdir: Path, split: str) -> float:
    """Accuracy of the restored classifier on a whole split file (labels neg=0, pos=1)."""
    from llm_jax.convert import restore_model
    from llm_jax.convert.tokenizer import load_hf_tokenizer
    from llm_jax.data import DataConfig, make_iterator

    restored = restore_model(workdir)
    tok = load_hf_tokenizer(workdir / "tokenizer")
    cfg = DataConfig(
        paths=(str(SPLITS["train"]),), validation_paths=(str(SPLITS[split]),),
        objective="classification", format="fasttext", seq_len=64, batch_size=64,
        label_names=("neg", "pos"), cache_dir=str(workdir / "eval_cache"),
    )  # fmt: skip
    classify = jax.jit(
        lambda b: restored.model.classify(
            b["tokens"], token_type_ids=b["token_type_ids"], segment_ids=b["segment_ids"],
            positions=b["positions"],
        )
    )  # fmt: skip
    right = total = 0.0
    for batch in make_iterator(cfg, tok, split="validation"):
        pred = np.asarray(classify(batch)).argmax(-1)
        w = np.asarray(batch["label_weights"])
        right += float(((pred == np.asarray(batch["labels"])) * w).sum())
        total += float(w.sum())
    return right / total


def pretrain_bert_tiny(workdir: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "llm_jax.cli", "train", str(ROOT / "configs/bert_tiny.yaml"),
           f"workdir={workdir}", f"train.steps={steps}", "train.progress=false",
           f"data.paths=[{DATA / 'bible-kjv.txt'}]"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", help="a Hugging Face BERT folder (e.g. all-MiniLM-L6-v2)")
    p.add_argument("--base-run", help="our pretrained bert_tiny run (pretrained if absent)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--skip-ours", action="store_true", help="only the --hf base")
    p.add_argument("--out", default="runs/finetune_sentiment_bench")
    args = p.parse_args()
    out = Path(args.out).absolute()
    bases = []
    run = Path(args.base_run or out / "bert_tiny").absolute()
    if not args.skip_ours:
        if not (run / "checkpoints").is_dir():
            print(f"pretraining bert_tiny into {run} ...", flush=True)
            pretrain_bert_tiny(run, args.pretrain_steps)
        bases.append(("bert_tiny (ours)", [f"init.from_checkpoint={run}"], 1))
    if args.hf:
        bases.append(
            ("MiniLM-L6 (HF)", ["init.from_checkpoint=null", f"init.from_hf={args.hf}"], 2)
        )
    rows = []
    for base_name, base_args, lr_col in bases:
        for method in args.methods.split(","):
            overrides, *lrs = METHODS[method]
            wd = out / f"{base_name.split()[0]}_{method.replace(':', '').replace(' ', '_')}"
            r = run_method(wd, base_args, overrides, lrs[lr_col - 1], args.steps)
            r.update(
                base=base_name, method=method, dev=accuracy(wd, "dev"), test=accuracy(wd, "test")
            )
            rows.append(r)
            print(json.dumps(r), flush=True)
    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bow_baseline import bow_baseline

        bow = bow_baseline(*(SPLITS[s] for s in ("train", "dev", "test")))
    except ImportError:
        bow = None
    n = jax.device_count()
    print(f"\nsentiment-mr, {args.steps} steps x batch 32, seq_len 64, {n} CPU device(s)")
    head = (
        "| base | method | trainable | of | optimizer state | peak RSS | s/step | wall "
        "| dev acc | test acc |"
    )
    print(head + "\n|" + "---|" * 10)
    for r in rows:
        print(
            f"| {r['base']} | {r['method']} | {r['trainable']:,} | {r['total']:,} | "
            f"{r['opt_mib']:.2f} MiB | {r['peak_rss_gib']:.2f} GiB | {r['s_per_step']:.3f} | "
            f"{r['wall_s']:.0f} s | {r['dev']:.3f} | {r['test']:.3f} |"
        )
    if bow is not None:
        name = "bag-of-words logistic regression (numpy)"
        dev, test = bow["dev_accuracy"], bow["test_accuracy"]
        print(f"| {name} | | | | | | | | {dev:.3f} | {test:.3f} |")


if __name__ == "__main__":
    main()
