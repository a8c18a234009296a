"""docs/theory_to_practice.md points at real code, real tests and real notebook sections.

The guide names code as `llm_jax/path/file.py::name` (or `::Class.method`), tests as
`tests/test_x.py::test_name` and reference twins as `tests/reference/x.py::name`, and
notebook sections as `colab/NN_name.ipynb § Heading`. Code is imported and the dotted name
resolved; test files are read by AST (nothing heavy is imported); a notebook section must
be a markdown line `# ## Heading` of the jupytext twin `colab/NN_name.py`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "theory_to_practice.md"
GUIDE_LINK = "docs/theory_to_practice.md"

CODE_REF = re.compile(r"`((?:llm_jax|tests)/[\w/]+\.py)::([A-Za-z_][\w.]*)`")
NOTEBOOK_REF = re.compile(r"`colab/(\d\d_\w+)\.ipynb § ([^`]+)`")
CHAPTER = re.compile(r"^## \d+\. (.+)$", re.MULTILINE)

# The chapters issue 14 asks for, as the guide titles them.
CHAPTERS = (
    "Language models and the probability of a sentence",
    "Softmax and numerical stability",
    "Cross-entropy, maximum likelihood and label smoothing",
    "Attention and multi-head attention",
    "Positional encodings: sinusoidal, learned, rotary, T5 relative bias",
    "LayerNorm, RMSNorm and residual connections",
    "Encoder, decoder, encoder–decoder",
    "GPT",
    "BERT: MLM, NSP, RoBERTa, ALBERT",
    "T5 span corruption",
    "Word2Vec: CBOW, skip-gram, negative sampling, hierarchical softmax",
    "ELMo",
    "Pretraining: the loop, optimizer schedules, MFU",
    "Fine-tuning strategies: full, top-k layers, prompt tuning, LoRA",
    "Beam search and sampling",
    "Generation metrics and zero/few-shot evaluation",
    "Compression: quantization, pruning, distillation",
    "Distributed training: mesh, logical axes, dp/fsdp/tp, jax.distributed",
)


def _guide() -> str:
    assert GUIDE.is_file(), f"{GUIDE} is missing"
    return GUIDE.read_text(encoding="utf-8")


def _chapters(text: str) -> dict[str, str]:
    """Chapter title -> its text up to the next chapter heading."""
    heads = list(CHAPTER.finditer(text))
    ends = [m.start() for m in heads[1:]] + [len(text)]
    return {m.group(1).strip(): text[m.end() : end] for m, end in zip(heads, ends, strict=True)}


def _resolve_code(path: str, name: str) -> str | None:
    """None if `name` (dotted) is an attribute of the module at `path`, else why not."""
    if not (ROOT / path).is_file():
        return f"{path} does not exist"
    module_name = path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # any import failure is a broken reference
        return f"{path} does not import: {e!r}"
    for part in name.split("."):
        if not hasattr(obj, part):
            return f"{path} has no {name} ({part!r} is missing)"
        obj = getattr(obj, part)
    return None


@functools.cache
def _top_level(file: Path) -> dict[str, ast.AST]:
    """The names a Python file defines at top level (functions, classes, assignments)."""
    out: dict[str, ast.AST] = {}
    for node in ast.parse(file.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            out.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    return out


def _resolve_test(path: str, name: str, root: Path = ROOT) -> str | None:
    """None if the file at `path` defines `name` (`f` or `Class.method`), by AST; a test
    file's name must be a test (test_* function, Test* class)."""
    file = root / path
    if not file.is_file():
        return f"{path} does not exist"
    defs = _top_level(file)
    head, _, method = name.partition(".")
    if head not in defs:
        return f"{path} defines no {head}"
    node = defs[head]
    if method:
        methods = {
            n.name
            for n in getattr(node, "body", [])
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        if not isinstance(node, ast.ClassDef) or method not in methods:
            return f"{path}: {head} has no method {method}"
    is_test_file = Path(path).name.startswith("test_")
    if is_test_file and not (head.startswith("test_") or head.startswith("Test")):
        return f"{path}::{name} is not a test"
    return None


def _resolve_notebook(stem: str, heading: str, root: Path = ROOT) -> str | None:
    """None if colab/<stem>.py has the markdown line `# ## <heading>`, else why not."""
    py = root / "colab" / f"{stem}.py"
    if not py.is_file():
        return f"colab/{stem}.py does not exist (wanted for '## {heading}')"
    lines = {line.rstrip() for line in py.read_text(encoding="utf-8").splitlines()}
    if f"# ## {heading}" not in lines:
        return f"colab/{stem}.py has no markdown heading '## {heading}'"
    return None


def _problem(path: str, name: str, root: Path = ROOT) -> str | None:
    if path.startswith("llm_jax/"):
        return _resolve_code(path, name)
    return _resolve_test(path, name, root)


def test_every_chapter_has_equations_code_tests_and_a_notebook():
    chapters = _chapters(_guide())
    missing = [c for c in CHAPTERS if c not in chapters]
    assert not missing, f"chapters missing from the guide: {missing}"
    for title in CHAPTERS:
        body = chapters[title]
        refs = [path for path, _ in CODE_REF.findall(body)]
        assert body.count("$$") >= 2 and body.count("$$") % 2 == 0, f"{title}: no $$ equation"
        assert any(p.startswith("llm_jax/") for p in refs), f"{title}: names no function"
        assert any(p.startswith("tests/test_") for p in refs), f"{title}: names no test"
        assert NOTEBOOK_REF.search(body), f"{title}: names no notebook section"


def test_code_references_resolve():
    refs = sorted({r for r in CODE_REF.findall(_guide()) if r[0].startswith("llm_jax/")})
    assert len(refs) > 50, f"only {len(refs)} code references parsed"
    broken = [p for path, name in refs if (p := _resolve_code(path, name))]
    assert not broken, "broken code references:\n" + "\n".join(broken)


def test_test_references_exist():
    refs = sorted({r for r in CODE_REF.findall(_guide()) if r[0].startswith("tests/")})
    assert len(refs) > 50, f"only {len(refs)} test references parsed"
    broken = [p for path, name in refs if (p := _resolve_test(path, name))]
    assert not broken, "broken test references:\n" + "\n".join(broken)


def test_notebook_references_exist():
    refs = sorted(set(NOTEBOOK_REF.findall(_guide())))
    assert len(refs) > 20, f"only {len(refs)} notebook references parsed"
    broken = [p for stem, heading in refs if (p := _resolve_notebook(stem, heading))]
    assert not broken, "broken notebook references:\n" + "\n".join(broken)


def test_readme_links_the_guide():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"]({GUIDE_LINK})" in readme, f"README.md does not link {GUIDE_LINK}"


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("llm_jax/ops/softmax.py", "no_such_function"),
        ("llm_jax/ops/no_such_module.py", "softmax"),
        ("llm_jax/models/gpt.py", "GPT.no_such_method"),
        ("tests/test_ops.py", "test_no_such_test"),
        ("tests/test_ops.py", "test_layer_norm_matches_twin.no_such"),
        ("tests/test_ops.py", "_close"),
        ("tests/reference/ops_ref.py", "no_such_ref"),
    ],
)
def test_the_checker_catches_a_broken_reference(path, name):
    assert _problem(path, name) is not None


def test_the_checker_accepts_good_references_and_reads_notebook_headings(tmp_path):
    assert _problem("llm_jax/ops/softmax.py", "softmax") is None
    assert _problem("llm_jax/models/gpt.py", "GPT.features") is None
    assert _problem("tests/test_ops.py", "test_layer_norm_matches_twin") is None
    assert _problem("tests/reference/ops_ref.py", "softmax_ref") is None
    (tmp_path / "colab").mkdir()
    (tmp_path / "colab" / "99_x.py").write_text("# %% [markdown]\n# ## Real heading\n")
    assert _resolve_notebook("99_x", "Real heading", tmp_path) is None
    assert _resolve_notebook("99_x", "Other heading", tmp_path) is not None
    assert _resolve_notebook("98_y", "Real heading", tmp_path) is not None
