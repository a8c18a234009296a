"""The README's examples run as written.

Every ```python block is run, in README order, each in a fresh Python process whose cwd is
the repository root (the blocks are independent: each imports what it uses and writes only
under a temporary folder it creates). Every `llm-jax ...` line of the other blocks is parsed
by the real argument parser, so a renamed subcommand or flag fails here. The first ```bash
block is what a user (and CI, `.ci/run`) types first; its two lines are pinned.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
BLOCK_TIMEOUT_S = 240  # a generous ceiling on a loaded 2-core machine; the blocks take seconds


def readme_blocks(language: str | None = None) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order; `language` keeps only those."""
    blocks = [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(README.read_text())]
    return [b for b in blocks if language is None or b[0] == language]


def command_lines(body: str) -> list[str]:
    """The `llm-jax ...` commands of a shell block (comments skipped, `&&` chains split)."""
    commands = []
    for line in body.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("llm-jax"):
                commands.append(part)
    return commands


def test_first_bash_block_is_the_install_and_ci_commands():
    # .ci/run executes line 2 of this block; a user copies line 1 first.
    _, body = readme_blocks("bash")[0]
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    assert lines == [
        "pip install -e . && llm-jax train configs/tiny.yaml",
        'pip install -e ".[test]" && python -m pytest -q -n 2',
    ]


def test_every_llm_jax_command_parses():
    from llm_jax.cli import build_parser

    commands = [
        cmd
        for language, body in readme_blocks()
        if language != "python"
        for cmd in command_lines(body)
    ]
    assert len(commands) >= 5, commands  # the README shows train, sample, convert, ...
    parser = build_parser()
    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as e:  # argparse reports a bad command by exiting
            pytest.fail(f"README command does not parse ({e}): {cmd}")


def test_referenced_configs_exist():
    named = set(re.findall(r"configs/[\w.]+\.yaml", README.read_text()))
    assert named, "the README names no config"
    assert not [c for c in sorted(named) if not (ROOT / c).is_file()]


PYTHON_BLOCKS = readme_blocks("python")


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index, tmp_path):
    _, body = PYTHON_BLOCKS[index]
    env = dict(os.environ)  # conftest's fast-compile XLA flags and JAX_PLATFORMS=cpu
    env["LLM_JAX_CACHE"] = str(tmp_path / "cache")  # keep the user's token cache clean
    env["TMPDIR"] = str(tmp_path)  # the blocks' tempfile.mkdtemp() folders, cleaned by pytest
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", body],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"README python block {index + 1} failed:\n{body}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )


def test_there_are_python_blocks():
    assert len(PYTHON_BLOCKS) >= 3
