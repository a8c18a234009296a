"""`llm-jax convert` guards: the optional extra checked first, no silent overwrite of an
existing Hugging Face folder, and files written with the usual permissions."""

from __future__ import annotations

import builtins
import importlib.util
import os
import stat
from pathlib import Path

import pytest

from llm_jax.cli import main

HF = Path(__file__).parent / "fixtures" / "hf"


def test_missing_extra_names_the_install_command_and_creates_nothing(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    real_import = builtins.__import__

    def find_spec(name, *args, **kwargs):
        return None if name == "safetensors" else real_find_spec(name, *args, **kwargs)

    def no_safetensors(name, *args, **kwargs):
        if name.split(".")[0] == "safetensors":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    out = tmp_path / "out"
    assert main(["convert", "--from-hf", str(HF / "gpt2"), "--to-hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[convert]"' in err and "safetensors" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_to_hf_refuses_a_folder_with_files_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["convert", "--from-hf", str(HF / "gpt2"), "--to-hf", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_exported_files_follow_the_umask(tmp_path):
    out = tmp_path / "hf"
    old = os.umask(0o022)
    try:
        assert main(["convert", "--from-hf", str(HF / "gpt2"), "--to-hf", str(out)]) == 0
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("bad", ["file", "empty-ok"])
def test_to_hf_destination_kinds(tmp_path, bad):
    out = tmp_path / "dest"
    if bad == "file":
        out.write_text("x")
        assert main(["convert", "--from-hf", str(HF / "gpt2"), "--to-hf", str(out)]) == 2
    else:
        out.mkdir()
        assert main(["convert", "--from-hf", str(HF / "gpt2"), "--to-hf", str(out)]) == 0


@pytest.mark.parametrize("add_bos", [True, False])
def test_exported_sentencepiece_tokenizer_frames_text_as_in_training(tmp_path, add_bos):
    import json

    from llm_jax.convert.tokenizer import save_hf_tokenizer
    from llm_jax.data import train_tokenizer

    text = (Path(__file__).parent / "test_convert_cli.py").read_text(encoding="utf-8")
    tok = train_tokenizer(texts=[text], model_type="bpe", vocab_size=400, num_sentinels=0)
    save_hf_tokenizer(tok, tmp_path, add_bos=add_bos)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (add_bos, False)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok.encode("def test(tmp_path):")
    assert hf("def test(tmp_path):").input_ids == ([tok.bos_id] if add_bos else []) + ids


def test_export_of_a_training_run_keeps_its_bos_framing(tmp_path, corpora):
    import json

    import llm_jax.convert as lj_convert
    from llm_jax.train.config import config_from_dict
    from llm_jax.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((corpora / "shakespeare.txt").read_text(encoding="utf-8")[:20_000])
    cfg = {
        "model": {"preset": "gpt2-tiny", "d_model": 32, "num_layers": 1, "num_heads": 2},
        "data": {"paths": [str(corpus)], "tokenizer_type": "bpe", "vocab_size": 400},
        "train": {"steps": 1, "eval_every": 0, "progress": False},
        "workdir": str(tmp_path / "run"),
    }
    cfg["data"].update(seq_len=32, batch_size=8, use_cache=False, doc_split="line")
    train(config_from_dict(cfg))
    restored = lj_convert.restore_model(tmp_path / "run")
    assert restored.step_dir == restored.ref.dir and restored.tokenizer_dir is not None
    out = tmp_path / "hf"
    assert main(["convert", "--from-checkpoint", str(tmp_path / "run"), "--to-hf", str(out)]) == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_ctrl_c_at_any_point_of_start_up_is_one_line(tmp_path, delay):
    """SIGINT while Python, JAX and the model load: one line and exit 130, never a
    traceback, a swallowed interrupt or an aborted teardown."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "llm_jax.cli", "convert", "--from-hf", str(HF / "gpt2")]
    proc = subprocess.Popen(
        [*cmd, "--to-hf", str(tmp_path / "out")],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if (tmp_path / "out" / "config.json").exists():  # done before (or as) the signal came
        pytest.skip(f"the conversion finished within {delay} s")
    if "init_import_site" in err:  # a loaded machine: still in Python's own start-up
        pytest.skip(f"the signal came before Python had imported its site module ({delay} s)")
    assert proc.returncode == 130, err
    assert err == "llm-jax: interrupted by signal 2; exiting.\n"
