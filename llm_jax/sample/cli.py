"""`llm-jax sample`: generate text from a training checkpoint.

    llm-jax sample --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 64
    llm-jax sample --checkpoint runs/tiny --prompt "import " --strategy sample \
        --temperature 0.8 --top-p 0.95 --seed 1
    llm-jax sample --checkpoint runs/tiny --prompt "class " --strategy beam --num-beams 4
    llm-jax sample --hf path/to/gpt2 --prompt "Hello, I'm a language model,"
    llm-jax sample --checkpoint runs/tiny --draft runs/tiny_draft --speculate-k 4 \
        --prompt "def main("

Greedy and sampled text is streamed to stdout as it is generated (the prompt first, for a
decoder-only model); beam search prints every finished beam, best first, with its score.
With `--draft` (speculative decoding, greedy or sample) the text streams a verification
round at a time, and the draft's acceptance rate goes to stderr. What was loaded goes to
stderr, so stdout holds only text.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

STRATEGIES = ("greedy", "sample", "beam")
SAMPLE_FLAGS = ("temperature", "top_k", "top_p")
BEAM_FLAGS = ("num_beams", "length_penalty")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strategy_name(args: argparse.Namespace) -> str:
    """--strategy, or the one implied by the flags given; conflicting flags are an error."""
    sampling = [_flag(n) for n in SAMPLE_FLAGS if getattr(args, n) is not None]
    beam = [_flag(n) for n in BEAM_FLAGS if getattr(args, n) is not None]
    name = args.strategy or ("beam" if beam else "sample" if sampling else "greedy")
    if sampling and name != "sample":
        verb = "applies" if len(sampling) == 1 else "apply"
        raise ValueError(f"{', '.join(sampling)} {verb} to --strategy sample, not {name}.")
    if beam and name != "beam":
        verb = "applies" if len(beam) == 1 else "apply"
        raise ValueError(f"{', '.join(beam)} {verb} to --strategy beam, not {name}.")
    return name


def _strategy(name: str, args: argparse.Namespace):
    from llm_jax.sample import Beam, Greedy, Sample

    if name == "sample":
        return Sample(
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=0 if args.top_k is None else args.top_k,
            top_p=1.0 if args.top_p is None else args.top_p,
        )
    if name == "beam":
        beams = 4 if args.num_beams is None else args.num_beams
        return Beam(
            num_beams=beams,
            length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
            num_return_sequences=beams,
        )
    return Greedy()


class TextStream:
    """Turns generated ids into text increments as they arrive.

    The context (the prompt's ids, for a decoder-only model) and the whole continuation are
    re-decoded at every token, so pieces that only make sense together (byte-fallback UTF-8
    sequences, SentencePiece's leading spaces, also on the first generated piece) come out
    right; a trailing U+FFFD (an incomplete UTF-8 sequence) is held back until it completes.
    `printed` starts as the context's own text.
    """

    def __init__(
        self,
        tokenizer: Any,
        context: list[int] | tuple[int, ...] = (),
        *,
        sentinels: bool = False,
    ):
        self.tokenizer = tokenizer
        self.sentinels = sentinels
        self.ids: list[int] = list(context)
        self.printed = self._decode()

    def _decode(self) -> str:
        return render(self.tokenizer, self.ids, sentinels=self.sentinels)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self._decode().rstrip("\ufffd")
        if not text.startswith(self.printed):
            return ""  # an earlier piece changed meaning; wait until it settles
        new, self.printed = text[len(self.printed) :], text
        return new

    def flush(self) -> str:
        """The rest of the text; if it no longer extends what was printed, the whole text
        again on a new line (never dropped). A character cut off by the end of generation
        (an incomplete UTF-8 sequence, shown as U+FFFD) is left out."""
        text = self._decode().rstrip("\ufffd")
        new = text[len(self.printed) :] if text.startswith(self.printed) else "\n" + text
        self.printed = text
        return new


_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def render(tokenizer: Any, ids: list[int], *, sentinels: bool = False) -> str:
    """Text of generated `ids` without the named special tokens (BOS, EOS, padding, ...);
    with `sentinels`, T5's `<extra_id_N>` stay visible, as in T5's span-filling demos
    ("<extra_id_0> cute dog <extra_id_1> the <extra_id_2>")."""
    if not sentinels:
        return tokenizer.decode(ids, skip_special_tokens=True)
    named = set(tokenizer.special_ids.values())
    marks = {int(s) for s in getattr(tokenizer, "sentinel_ids", ())}
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
        if i in marks:
            parts += [tokenizer.decode(run).strip(), tokenizer.decode([i])]
            run = []
        elif i not in named:
            run.append(i)
    parts.append(tokenizer.decode(run).strip())
    # Spaced around each sentinel, as Hugging Face prints special tokens.
    return " ".join(p for p in parts if p)


def encode_with_sentinels(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer.encode(text)`, except that `<extra_id_N>` markers become the sentinel ids
    (`encode` never emits a special id, so literal marker text stays text otherwise).

    One space before a marker is taken to belong to the hidden span, as in pretraining,
    where "beginning God created" with "God" masked reads "beginning<extra_id_0> created".
    """
    if not getattr(tokenizer, "num_sentinels", 0):
        return list(tokenizer.encode(text))
    ids: list[int] = []
    last = 0
    for marker in _SENTINEL.finditer(text):
        before = text[last : marker.start()]
        ids += tokenizer.encode(before[:-1] if before.endswith(" ") else before)
        ids.append(tokenizer.sentinel_id(int(marker.group(1))))
        last = marker.end()
    return ids + list(tokenizer.encode(text[last:]))


def prompt_ids(tokenizer: Any, prompt: str, run_config: dict[str, Any], encoder_decoder: bool):
    """The prompt's token ids, framed as the model saw text in training.

    A training run's data config says it: BOS first (decoder-only, `data.add_bos`), EOS
    last (encoder inputs, `data.add_eos`). Without one (Hugging Face and converted models)
    the tokenizer's own framing is used when it has one (`add_special_tokens=True`, e.g.
    LLaMA's BOS, T5's EOS, none for GPT-2), else the same BOS / EOS rule.
    """
    data = run_config.get("data")
    bos, eos = tokenizer.special_ids.get("bos"), tokenizer.special_ids.get("eos")
    if data is None and hasattr(tokenizer, "save_hf"):  # a Hugging Face tokenizer
        ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    else:
        data = data or {}
        ids = (
            encode_with_sentinels(tokenizer, prompt)
            if encoder_decoder
            else tokenizer.encode(prompt)
        )
        ids = list(ids)
        if encoder_decoder:  # span-corruption and seq2seq inputs always end with EOS
            if eos is not None:
                ids = [*ids, eos]
        elif data.get("add_bos", True) and bos is not None:
            ids = [bos, *ids]
    if not ids:
        raise ValueError(
            "--prompt encodes to no tokens and nothing (BOS/EOS) frames it; give a non-empty "
            "prompt."
        )
    return ids


def _check_generates(model: Any, where: Path) -> None:
    family = model.cfg.family
    if family not in ("gpt", "t5"):
        raise ValueError(
            f"{where} holds a {family} model, an encoder that does not generate text; "
            "sample from a gpt or t5 model."
        )


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], str]:
    """(model, tokenizer, saved run config, what was loaded); the model must generate."""
    from llm_jax.convert.load import load_for_inference

    loaded = load_for_inference(args.checkpoint, args.hf, args.step)
    _check_generates(loaded.model, loaded.where)
    return loaded.model, loaded.tokenizer, loaded.run_config, loaded.what


def _check_lengths(decoder: Any, n: int, max_new_tokens: int) -> None:
    """generate's length check, run before the banner and naming the flags to change."""
    from llm_jax.sample.generate import check_fits

    flags = dict(new="--max-new-tokens", limit="the model has {} positions")
    limit = decoder.info.max_length
    if decoder.info.is_encoder_decoder:
        encoder_limit = decoder.info.max_encoder_length
        check_fits(n, 0, encoder_limit, prompt="--prompt", **flags)
        check_fits(1, max_new_tokens, limit, prompt="the decoder's start token", **flags)
    else:
        check_fits(n, max_new_tokens, limit, prompt="--prompt", **flags)


def _sample(args: argparse.Namespace) -> int:
    name = _strategy_name(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}.")
    strategy = _strategy(name, args)

    import jax

    import llm_jax.sample as sample
    from llm_jax.models import count_params

    model, tokenizer, run_config, what = _load(args)
    decoder = sample.as_decoder(model)
    encoder_decoder = decoder.info.is_encoder_decoder
    ids = prompt_ids(tokenizer, args.prompt, run_config, encoder_decoder)
    _check_lengths(decoder, len(ids), args.max_new_tokens)
    draft = None if args.draft is None else _load_draft(args, name, decoder, tokenizer, ids)
    print(
        f"loaded {what} ({model.cfg.family}, {count_params(model):,} parameters)",
        file=sys.stderr,
    )
    eos = tokenizer.special_ids.get("eos")
    common = dict(max_new_tokens=args.max_new_tokens, eos_id=eos, pad_id=0)
    context = [] if encoder_decoder else ids  # decoder-only text continues the prompt
    # An encoder-decoder's output shows T5's sentinels: a span-corruption model answers
    # "<extra_id_0> span <extra_id_1> ...", which would print as nothing without them.
    sentinels = encoder_decoder
    out = sys.stdout

    if draft is not None:
        print(f"draft: {draft[1]}", file=sys.stderr)
        return _speculate(args, decoder, draft[0], tokenizer, context, strategy, common)

    if name == "beam":
        result = sample.generate(decoder, [ids], strategy=strategy, **common)
        scores = jax.device_get(result.scores)[0]
        for rank, (beam_ids, score) in enumerate(zip(result.to_lists()[0], scores, strict=True)):
            text = render(tokenizer, context + beam_ids, sentinels=sentinels)
            out.write(f"--- beam {rank + 1} (score {float(score):.4f}) ---\n{text}\n")
            out.write(_filled_line(tokenizer, ids, beam_ids) if sentinels else "")
        out.flush()
        return 0

    rng = jax.random.key(args.seed) if name == "sample" else None
    text = TextStream(tokenizer, context, sentinels=sentinels)
    out.write(text.printed)
    out.flush()
    generated: list[int] = []
    for tokens in sample.stream(decoder, [ids], strategy=strategy, rng=rng, **common):
        generated.append(int(tokens[0]))
        out.write(text.push(generated[-1]))
        out.flush()
    out.write(text.flush() + "\n")
    out.write(_filled_line(tokenizer, ids, generated) if sentinels else "")
    out.flush()
    return 0


def _load_draft(
    args: argparse.Namespace, name: str, decoder: Any, tokenizer: Any, ids: list[int]
) -> tuple[Any, str]:
    """(the --draft model, what was loaded): a training run, or a Hugging Face folder with
    safetensors; its tokenizer must turn the prompt into the same ids."""
    from llm_jax.convert.load import load_for_inference

    if name == "beam":
        raise ValueError("--draft speculates greedy or sampled decoding, not --strategy beam.")
    if decoder.info.is_encoder_decoder:
        raise ValueError("--draft works with decoder-only models; this one is an encoder-decoder.")

    folder = Path(args.draft)
    hf = (folder / "model.safetensors").exists() or any(folder.glob("*.safetensors.index.json"))
    loaded = load_for_inference(None, str(folder), None) if hf else load_for_inference(str(folder))
    _check_generates(loaded.model, loaded.where)
    theirs = prompt_ids(loaded.tokenizer, args.prompt, loaded.run_config, False)
    if loaded.tokenizer.vocab_size != tokenizer.vocab_size or theirs != ids:
        raise ValueError(
            f"--draft {args.draft} has a different tokenizer ({loaded.tokenizer.vocab_size} "
            f"tokens) from the model's ({tokenizer.vocab_size}); train the draft with the "
            "model's tokenizer (data.tokenizer_path)."
        )
    return loaded.model, loaded.what


def _speculate(args, decoder, draft, tokenizer, context, strategy, common) -> int:
    """--draft: speculative greedy / sampling, streamed a verification round at a time."""
    import jax

    import llm_jax.sample as sample

    draft = sample.as_decoder(draft)
    spec = sample.Speculative(draft=draft, k=args.speculate_k, sampling=strategy)
    rng = jax.random.key(args.seed) if isinstance(strategy, sample.Sample) else None
    tokens = sample.stream(decoder, [context], strategy=spec, rng=rng, **common)
    text = TextStream(tokenizer, context)
    sys.stdout.write(text.printed)
    sys.stdout.flush()
    for column in tokens:
        sys.stdout.write(text.push(int(column[0])))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()
    print(
        f"speculative: k={args.speculate_k}, acceptance rate {tokens.acceptance_rate:.3f}",
        file=sys.stderr,
    )
    return 0


def _filled_line(tokenizer: Any, inputs: list[int], outputs: list[int]) -> str:
    """ "filled: <the input with its sentinels replaced by the generated spans>" when the
    input has sentinels to fill; else nothing."""
    sentinel_ids = getattr(tokenizer, "sentinel_ids", ())
    if not set(inputs) & {int(s) for s in sentinel_ids}:
        return ""
    import numpy as np

    from llm_jax.data import reconstruct_span_corruption

    marks = {int(s) for s in sentinel_ids}
    first = next((i for i, t in enumerate(outputs) if t in marks), len(outputs))
    filled = reconstruct_span_corruption(
        np.asarray(inputs), np.asarray(outputs[first:]), sentinel_ids, tokenizer.eos_id
    )
    return f"filled: {render(tokenizer, filled.tolist(), sentinels=True)}\n"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text from a trained checkpoint",
        description="Generate text from an `llm-jax train` checkpoint: greedy or sampled text "
        "streams to stdout; beam search prints every finished beam. The strategy defaults to "
        "the one the flags imply (greedy without any).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a training workdir (or its checkpoints/ folder, one step folder, or a "
        "checkpoint written by `llm-jax convert --to`)",
    )
    source.add_argument(
        "--hf",
        metavar="DIR",
        help="a Hugging Face model folder (config.json, safetensors, tokenizer files)",
    )
    p.add_argument("--prompt", required=True, help="the text to continue (T5: the input)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="sample (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=None, help="sample; 1.0 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="sample: PRNG seed")
    p.add_argument("--num-beams", type=int, default=None, help="beam (default 4)")
    p.add_argument("--length-penalty", type=float, default=None, help="beam (default 1.0)")
    p.add_argument(
        "--draft",
        metavar="DIR",
        default=None,
        help="speculative decoding with this draft: a training run or a Hugging Face folder "
        "(same tokenizer, fewer layers)",
    )
    p.add_argument("--speculate-k", type=int, default=4, help="--draft: tokens proposed per round")
    p.set_defaults(func=_sample)
