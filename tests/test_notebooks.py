"""The colab/ notebooks: each `.ipynb` in sync with its jupytext `py:percent` twin, outputs
stripped, the same install cell everywhere (pointing at pyproject's repository URL), and each
one executed top to bottom in a fresh kernel in smoke mode (`LLM_JAX_SMOKE=1`) on CPU, with
every cell tagged `plot` rendering a picture."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 400  # a ceiling for one cell on a loaded 2-core CI machine


def _ids(paths):
    return [p.stem for p in paths]


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def _first_code(nb) -> str:
    return next(c.source for c in nb.cells if c.cell_type == "code")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1, f"no colab/NN_*.py notebooks under {COLAB}"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_ipynb_is_the_py_twin_with_outputs_stripped(py):
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} is missing: run `jupytext --sync {py}`"
    paired = nbformat.read(ipynb, as_version=4)
    assert _cells(jupytext.read(py)) == _cells(paired), (
        f"{ipynb.name} and {py.name} differ: edit the .py and run `jupytext --sync {py}`"
    )
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{ipynb.name} has outputs: strip them (`jupytext --sync` from the .py)"
            )


def test_every_notebook_has_the_same_install_cell_at_the_repository_url():
    jupytext = pytest.importorskip("jupytext")
    url = re.search(r'^Repository = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    cells = {py.name: _first_code(jupytext.read(py)) for py in NOTEBOOKS}
    for name, cell in cells.items():
        assert f'"{url}"' in cell, f"{name}: the install cell must install from {url}"
        assert 'find_spec("llm_jax")' in cell, f"{name}: install only when llm_jax is missing"
    assert len(set(cells.values())) == 1, "the install cells differ between notebooks"


def _plot_cells(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if "plot" in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("py", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom_in_smoke_mode(py, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    plots = _plot_cells(nb)
    assert plots, f"{py.name} tags no cell `plot`; every notebook draws at least one picture"
    monkeypatch.setenv("LLM_JAX_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("LLM_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / py.with_suffix(".ipynb").name)
    for i in plots:
        kinds = {k for out in nb.cells[i].outputs for k in out.get("data", {})}
        assert "image/png" in kinds, (
            f"{py.name} cell {i} is tagged `plot` but drew no picture:\n{nb.cells[i].source}"
        )
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors


def test_colab_readme_lists_every_notebook():
    text = (COLAB / "README.md").read_text()
    for py in NOTEBOOKS:
        assert re.search(rf"\b{re.escape(py.stem)}\b", text), f"colab/README.md omits {py.stem}"
