"""Speculative decoding speed: the target's greedy decoding vs speculative greedy, same run.

    python benchmarks/speculative.py --target runs/tiny --draft runs/tiny_draft \
        [--ks 2,4,6] [--max-new-tokens 64] [--repeats 3]

Both checkpoints must share a tokenizer (train the draft with
`data.tokenizer_path=<target run>/tokenizer`). The pair measured in issue 15's note (a
6-layer d_model-512 target, 19 M parameters, and the 4-layer d_model-128 tiny model as
draft, both on the default corpus; ~45 min on 2 busy cores):

    llm-jax train configs/tiny.yaml name=spec_target model.d_model=512 model.num_layers=6 \
        model.num_heads=8 model.d_ff=2048 model.max_position_embeddings=256 \
        train.steps=1000 optimizer.learning_rate=1.0e-3 optimizer.warmup_steps=100
    llm-jax train configs/tiny.yaml name=spec_draft model.max_position_embeddings=256 \
        data.tokenizer_path=runs/spec_target/tokenizer train.steps=800

Every case decodes the same prompts at batch 1 with EOS off, so each call generates
exactly max_new_tokens tokens; the speculative cases assert that their tokens equal the
target's greedy tokens. After one cold call each, the cases' calls alternate (target,
k=2, k=4, ..., target, ...) so load from other processes falls on all alike; the table
shows the best of --repeats rounds of all prompts. acceptance = accepted / proposed
draft tokens; tokens/round = new tokens per target call; "draft alone" is the draft's
own greedy speed. "ideal" is the speedup if a round cost exactly k draft steps plus one
target step (the verify call priced as a one-token step, no bookkeeping): tokens/round /
(k c + 1), with c = draft step / target step from this run's greedy speeds; measured /
ideal is what the loop's overhead leaves.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

import llm_jax.sample as sample
from llm_jax.convert.load import load_for_inference
from llm_jax.sample.cli import prompt_ids

PROMPTS = (
    "def __init__(self, ",
    "import os\nimport sys\n\n",
    "class Error(Exception):\n",
    "    for i in range(",
)


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.tokens)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--ks", default="2,4,6")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    target_run = load_for_inference(args.target, None, None)
    draft_run = load_for_inference(args.draft, None, None)
    target = sample.as_decoder(target_run.model)
    draft = sample.as_decoder(draft_run.model)
    cfg_t, cfg_d = target_run.model.cfg, draft_run.model.cfg
    print(f"target: {target_run.what} ({cfg_t.num_layers} layers, d_model {cfg_t.d_model})")
    print(f"draft:  {draft_run.what} ({cfg_d.num_layers} layers, d_model {cfg_d.d_model})")
    prompts = [prompt_ids(target_run.tokenizer, p, target_run.run_config, False) for p in PROMPTS]
    ks = [int(k) for k in args.ks.split(",")]
    n = args.max_new_tokens

    cases = {"target greedy": ("target", None), "draft alone": ("draft", None)}
    cases.update({f"speculative k={k}": ("target", k) for k in ks})

    def call(name: str, ids: list[int]):
        model, k = cases[name]
        decoder = target if model == "target" else draft
        strategy = sample.Greedy() if k is None else sample.Speculative(draft, k=k)
        return sample.generate(decoder, [ids], max_new_tokens=n, strategy=strategy)

    cold = {name: _time(lambda name=name: call(name, prompts[0]))[0] for name in cases}
    best = dict.fromkeys(cases, float("inf"))
    accepted = dict.fromkeys(cases, 0)
    proposed = dict.fromkeys(cases, 0)
    rounds_tokens = {}
    for _ in range(args.repeats):
        totals = dict.fromkeys(cases, 0.0)
        outs: dict[str, list] = {name: [] for name in cases}
        for ids in prompts:
            for name in cases:
                seconds, out = _time(lambda name=name, ids=ids: call(name, ids))
                totals[name] += seconds
                outs[name].append(out)
        for name in cases:
            best[name] = min(best[name], totals[name])
            if name.startswith("speculative"):
                for want, got in zip(outs["target greedy"], outs[name], strict=True):
                    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
                accepted[name] = sum(int(np.sum(o.draft_accepted)) for o in outs[name])
                proposed[name] = sum(int(np.sum(o.draft_proposed)) for o in outs[name])
                k = cases[name][1]
                rounds_tokens[name] = n * len(prompts) / (proposed[name] / k + len(prompts))

    tokens = n * len(prompts)
    base = tokens / best["target greedy"]
    print(f"\nbatch 1, {len(prompts)} prompts x {n} new tokens, best of {args.repeats}")
    print(
        f"{'case':<18} {'tokens/s':>9} {'vs target':>9} {'accept':>7} {'tok/round':>9} "
        f"{'cold s':>7} {'ideal':>6}"
    )
    for name in cases:
        rate = tokens / best[name]
        acc = f"{accepted[name] / proposed[name]:.3f}" if proposed[name] else "-"
        per_round = f"{rounds_tokens[name]:.2f}" if name in rounds_tokens else "-"
        ideal = "-"
        if name in rounds_tokens:
            c = best["draft alone"] / best["target greedy"]
            ideal = f"{rounds_tokens[name] / (cases[name][1] * c + 1):.2f}x"
        print(
            f"{name:<18} {rate:>9.1f} {rate / base:>8.2f}x {acc:>7} {per_round:>9} "
            f"{cold[name]:>7.2f} {ideal:>6}"
        )
    print("speculative tokens equal the target's greedy tokens: yes (asserted)")


if __name__ == "__main__":
    main()
