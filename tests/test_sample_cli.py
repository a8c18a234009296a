"""`llm-jax sample` end to end: a tiny character-level run is trained in-process, then the
CLI decodes from its checkpoint. Greedy, sampled and beam text must equal `generate` run
directly on the restored model; bad arguments fail with a one-line error before decoding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import pytest

import llm_jax as lj
import llm_jax.sample as sample
from llm_jax.cli import main
from llm_jax.train.config import config_from_dict
from llm_jax.train.loop import train

HF_GPT2 = Path(__file__).parent / "fixtures" / "hf" / "gpt2"
HF_LLAMA = HF_GPT2.parent / "llama"
PROMPT = "ROMEO:"
N = 24
CONFIG = {
    "name": "sample_cli_test",
    "model": {
        "preset": "gpt2-tiny",
        "d_model": 32,
        "num_layers": 1,
        "num_heads": 2,
        "d_ff": 64,
        "max_position_embeddings": 64,
    },
    "data": {
        "tokenizer_type": "char",
        "vocab_size": None,
        "num_sentinels": 0,
        "byte_fallback": False,
        "doc_split": "line",
        "seq_len": 32,
        "batch_size": 8,
        "use_cache": False,
    },
    "train": {
        "steps": 6,
        "log_every": 3,
        "eval_every": 0,
        "checkpoint_every": 3,
        "progress": False,
    },
    "optimizer": {"learning_rate": 1.0e-2, "warmup_steps": 1},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpora):
    root = tmp_path_factory.mktemp("sample_cli")
    corpus = root / "corpus.txt"
    corpus.write_text((corpora / "shakespeare.txt").read_text()[:3000])
    cfg = {**CONFIG, "workdir": str(root / "run")}
    cfg["data"] = {**CONFIG["data"], "paths": [str(corpus)]}
    train(config_from_dict(cfg))
    return root / "run"


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What the CLI loads: the restored model, its step and the step's tokenizer."""

    model: Any
    tokenizer: Any
    step: int
    source: Path


def load_checkpoint(path, step=None) -> Loaded:
    restored = lj.convert.restore_model(path, step)
    tokenizer = lj.convert.load_hf_tokenizer(restored.ref.tokenizer_dir())
    return Loaded(restored.model, tokenizer, restored.step, restored.ref.dir)


@pytest.fixture(scope="module")
def loaded(workdir):
    return load_checkpoint(workdir)


def run_cli(capsys, *args):
    code = main(["sample", *args])
    out, err = capsys.readouterr()
    return code, out, err


def prompt_ids(loaded):
    return [loaded.tokenizer.special_ids["bos"], *loaded.tokenizer.encode(PROMPT)]


def direct(loaded, **kwargs):
    """`generate` called directly on the restored model, as the CLI's settings imply."""
    out = sample.generate(
        loaded.model,
        [prompt_ids(loaded)],
        max_new_tokens=N,
        eos_id=loaded.tokenizer.special_ids["eos"],
        **kwargs,
    )
    return out


def text(loaded, ids):
    return loaded.tokenizer.decode(ids, skip_special_tokens=True)


def test_loads_latest_step_with_tokenizer(loaded, workdir):
    assert loaded.step == 6
    assert loaded.source == workdir / "checkpoints" / "6"
    assert loaded.tokenizer.model_type == "char"
    assert loaded.model.cfg.num_layers == 1


def test_greedy_streams_what_generate_returns(capsys, workdir, loaded):
    code, out, err = run_cli(
        capsys, "--checkpoint", str(workdir), "--prompt", PROMPT, "--max-new-tokens", str(N)
    )
    assert code == 0, err
    expected = direct(loaded).to_lists()[0]
    assert len(expected) > 0
    assert out == PROMPT + text(loaded, expected) + "\n"
    assert "loaded step 6" in err


def test_sample_is_seeded_and_equals_generate(capsys, workdir, loaded):
    args = ["--checkpoint", str(workdir), "--prompt", PROMPT, "--max-new-tokens", str(N)]
    args += ["--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "3"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    strategy = sample.Sample(temperature=0.9, top_k=20, top_p=0.95)
    expected = direct(loaded, strategy=strategy, rng=jax.random.key(3)).to_lists()[0]
    assert out == PROMPT + text(loaded, expected) + "\n"
    assert run_cli(capsys, *args)[1] == out  # same seed, same text


def test_beam_prints_every_finished_beam(capsys, workdir, loaded):
    code, out, err = run_cli(
        capsys,
        *("--checkpoint", str(workdir / "checkpoints" / "3"), "--prompt", PROMPT),
        *("--strategy", "beam", "--num-beams", "3", "--max-new-tokens", str(N)),
    )
    assert code == 0, err
    assert "loaded step 3" in err
    at_3 = load_checkpoint(workdir, step=3)
    result = direct(at_3, strategy=sample.Beam(num_beams=3, num_return_sequences=3))
    expected = "".join(
        f"--- beam {r + 1} (score {float(s):.4f}) ---\n{PROMPT}{text(at_3, ids)}\n"
        for r, (ids, s) in enumerate(zip(result.to_lists()[0], result.scores[0], strict=True))
    )
    assert out == expected


def test_hf_folder_greedy_equals_generate(capsys):
    code, out, err = run_cli(
        capsys, "--hf", str(HF_GPT2), "--prompt", "Hello world", "--max-new-tokens", str(N)
    )
    assert code == 0, err
    assert "Hugging Face model" in err
    model, tokenizer = lj.convert.load_hf(HF_GPT2), lj.convert.load_hf_tokenizer(HF_GPT2)
    ids = tokenizer.encode("Hello world", add_special_tokens=True)
    result = sample.generate(
        model, [ids], max_new_tokens=N, eos_id=tokenizer.special_ids.get("eos")
    )
    expected = tokenizer.decode(result.to_lists()[0], skip_special_tokens=True)
    assert out == "Hello world" + expected + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{root}/missing"], "does not exist"),
        (["--checkpoint", "{root}"], "no checkpoint in"),
        (["--checkpoint", "{run}", "--step", "5"], "no checkpoint step 5"),
        (["--checkpoint", "{run}", "--prompt", "e" * 64], "has 64 positions"),
        (["--checkpoint", "{run}", "--max-new-tokens", "60"], "lower --max-new-tokens to"),
        (["--checkpoint", "{run}", "--strategy", "greedy", "--top-p", "0.9"], "--top-p applies"),
        (["--checkpoint", "{run}", "--temperature", "-1"], "temperature must be >= 0"),
        (["--hf", "{root}/missing"], "is not a folder"),
        (["--hf", str(HF_GPT2), "--step", "3"], "--step applies to --checkpoint"),
    ],
)
def test_errors_are_one_line_and_name_the_fix(capsys, workdir, args, message):
    args = [a.format(root=workdir.parent, run=workdir) for a in args]
    if "--prompt" not in args:
        args += ["--prompt", PROMPT]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert out == ""
    assert message in err and err.startswith("llm-jax sample: error:")
    assert err.count("\n") == 1


def test_text_stream_keeps_the_space_between_prompt_and_continuation():
    """SentencePiece drops a leading '▁' when a continuation is decoded alone; the stream
    decodes it after the prompt, so 'Citizen' + ' hello' does not print 'Citizenhello'."""
    from llm_jax.convert import load_hf_tokenizer
    from llm_jax.sample.cli import TextStream

    tok = load_hf_tokenizer(HF_LLAMA)
    text = "First Citizen: hello there"
    ids = tok.encode(text)
    cut = next(i for i in range(1, len(ids)) if tok.id_to_piece(ids[i]).startswith("▁"))
    assert tok.decode(ids[:cut]) + tok.decode(ids[cut:]) != text  # the space decoding alone loses
    stream = TextStream(tok, ids[:cut])
    out = stream.printed + "".join(stream.push(t) for t in ids[cut:]) + stream.flush()
    assert out == tok.decode(ids) == text


HF_T5 = HF_GPT2.parent / "t5"


def test_t5_output_shows_sentinels_and_the_filled_input(capsys):
    """A span-corruption T5 answers in sentinels; they are printed (as T5's demos do), and
    the prompt's own `<extra_id_N>` markers are sentinel ids whose spans are filled in."""
    from llm_jax.sample.cli import encode_with_sentinels, render

    prompt = "Hello <extra_id_0> world <extra_id_1>"
    code, out, err = run_cli(capsys, "--hf", str(HF_T5), "--prompt", prompt)
    assert code == 0, err
    model, tok = lj.convert.load_hf(HF_T5), lj.convert.load_hf_tokenizer(HF_T5)
    ids = [*encode_with_sentinels(tok, prompt), tok.eos_id]
    assert ids[tok.encode("Hello").__len__()] == tok.sentinel_id(0)
    generated = sample.generate(model, [ids], max_new_tokens=64, eos_id=tok.eos_id).to_lists()[0]
    lines = out.splitlines()
    assert lines[0] == render(tok, generated, sentinels=True)
    from llm_jax.data import reconstruct_span_corruption

    marks = set(tok.sentinel_ids.tolist())
    first = next((i for i, t in enumerate(generated) if t in marks), len(generated))
    filled = reconstruct_span_corruption(ids, generated[first:], tok.sentinel_ids, tok.eos_id)
    filled = filled.tolist()
    assert lines[1] == "filled: " + render(tok, filled, sentinels=True)
    assert "<extra_id_" in out  # the untrained fixture leaves sentinels to show


def test_sentinel_helpers_literal():
    from llm_jax.data import reconstruct_span_corruption as fill
    from llm_jax.sample.cli import TextStream, encode_with_sentinels, render

    tok = lj.data.train_tokenizer(
        texts=["the cute dog walks in the park\n"] * 20, model_type="char", num_sentinels=3
    )
    s0, s1, s2 = (tok.sentinel_id(i) for i in range(3))
    ids = encode_with_sentinels(tok, "the <extra_id_0> walks <extra_id_1>")
    assert ids == [*tok.encode("the"), s0, *tok.encode(" walks"), s1]
    out = [s0, *tok.encode(" cute dog"), s1, *tok.encode(" in the park"), s2, tok.eos_id]
    assert (
        render(tok, out, sentinels=True)
        == "<extra_id_0> cute dog <extra_id_1> in the park <extra_id_2>"
    )
    assert render(tok, out) == " cute dog in the park"
    whole = tok.decode(fill(ids, out, tok.sentinel_ids, tok.eos_id))
    assert whole == "the cute dog walks in the park"
    # A sentinel the model left unfilled stays visible.
    assert render(
        tok, fill(ids, [s1, *tok.encode(" x")], tok.sentinel_ids).tolist(), sentinels=True
    ) == ("the <extra_id_0> walks x")
    # A character cut off by the end of generation is not printed as U+FFFD.
    e_acute = tok.encode("é")  # two byte-fallback ids
    stream = TextStream(tok, tok.encode("caf"))
    assert stream.push(e_acute[0]) == "" and stream.flush() == ""


def test_draft_speculates_the_greedy_text(capsys, workdir, loaded):
    """--draft (here the run itself as its own draft) prints generate's greedy text."""
    args = ["--checkpoint", str(workdir), "--prompt", PROMPT, "--max-new-tokens", str(N)]
    code, out, err = run_cli(capsys, *args, "--draft", str(workdir), "--speculate-k", "3")
    assert code == 0, err
    assert out == PROMPT + text(loaded, direct(loaded).to_lists()[0]) + "\n"
    assert "speculative: k=3, acceptance rate" in err


def test_draft_with_another_tokenizer_is_refused(capsys, workdir):
    args = ["--checkpoint", str(workdir), "--prompt", PROMPT, "--max-new-tokens", "8"]
    args += ["--draft", str(HF_GPT2)]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert "has a different tokenizer" in err and err.startswith("llm-jax sample: error:")
