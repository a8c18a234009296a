"""Distillation figures: a student with half the layers of the tiny teacher (configs/tiny.yaml),
trained from scratch vs distilled from the teacher (α·T²·KL + (1 − α)·CE), with and without
starting from every other teacher layer: held-out perplexity of each and of the teacher, and
the student's greedy decode speed over the teacher's.

    python benchmarks/distill.py [--teacher-run runs/tiny] [--steps 300] [--alpha 0.5]

Without --teacher-run the teacher is trained first with `llm-jax train configs/tiny.yaml`.
All students train the same steps on the teacher's data and tokenizer and are scored on the
same held-out batches; speeds are measured in the same process, the ratio printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_common import (
    ROOT,
    decode_speeds,
    heldout,
    heldout_batches,
    run_config,
    table,
    train_cli,
    train_dict,
)

from llm_jax.convert import restore_model
from llm_jax.models.common import count_params

TINY = ROOT / "configs" / "tiny.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-run", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llm_jax_distill_bench"))
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300, help="student training steps")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--eval-batches", type=int, default=8)
    args = p.parse_args()
    out = args.workdir
    out.mkdir(parents=True, exist_ok=True)
    teacher_run = args.teacher_run or out / "teacher"
    if not (teacher_run / "checkpoints").exists():
        train_cli(TINY, teacher_run, f"train.steps={args.teacher_steps}")
    teacher = restore_model(teacher_run).model
    half = max(teacher.cfg.num_layers // 2, 1)
    kd = {"teacher": str(teacher_run), "distill_alpha": args.alpha,
          "distill_temperature": args.temperature}  # fmt: skip
    students = {
        "student from scratch": {},
        "distilled student": kd,
        "distilled, init from teacher layers": {**kd, "distill_init": "alternate"},
    }
    batches = heldout_batches(teacher_run, args.eval_batches)
    rows = [{"model": f"teacher ({teacher.cfg.num_layers} layers)", "params": count_params(teacher),
             "ppl": heldout(teacher, batches)["ppl"]}]  # fmt: skip
    models = {rows[0]["model"]: teacher}
    for i, (name, train) in enumerate(students.items()):
        workdir = out / f"student{i}"
        d = run_config(TINY, teacher_run, workdir, model={"num_layers": half},
                       train={"steps": args.steps, "eval_every": 0,
                              "checkpoint_every": args.steps, **train})  # fmt: skip
        if not (workdir / "checkpoints").exists():
            train_dict(d)
        model = restore_model(workdir).model
        rows.append({"model": f"{name} ({half} layers)", "params": count_params(model),
                     "ppl": heldout(model, batches)["ppl"]})  # fmt: skip
        models[rows[-1]["model"]] = model
    speeds = decode_speeds(models)
    for row in rows:
        row["tok/s"] = speeds[row["model"]]
        row["speed ratio"] = speeds[row["model"]] / speeds[rows[0]["model"]]
    print(f"## Distillation: {args.steps} student steps, α={args.alpha}, T={args.temperature}\n")
    print(table(rows, ["model", "params", "ppl", "tok/s", "speed ratio"]))
    (out / "distill.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
