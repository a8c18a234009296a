"""Comparing two pytrees of arrays by structure, shape and (optionally) dtype.

One check for every "does this checkpoint fit this model" question: the manager's restore,
`convert.restore_model` and `convert.model_from_params` all phrase their errors from it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _key_name(entry: Any) -> str:
    """One pytree key-path entry as a plain string, matching orbax's nested-dict metadata."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_name(path: tuple[Any, ...]) -> str:
    """A key path as a dotted name, e.g. 'params.embed.embedding' ('<root>' for a leaf)."""
    return ".".join(_key_name(e) for e in path) or "<root>"


def _describe(leaf: Any, dtypes: bool) -> tuple[tuple[int, ...] | None, np.dtype | None]:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None) if dtypes else None
    return (
        None if shape is None else tuple(shape),
        None if dtype is None else np.dtype(dtype),
    )


def _flat(tree: Any, dtypes: bool) -> dict[str, tuple[tuple[int, ...] | None, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {leaf_name(path): _describe(leaf, dtypes) for path, leaf in leaves}


def _listing(names: list[str], limit: int) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _spec(shape: tuple[int, ...] | None, dtype: Any) -> str:
    return f"{shape}" + ("" if dtype is None else f" {dtype}")


def tree_mismatch(
    have: Any,
    want: Any,
    *,
    limit: int = 8,
    dtypes: bool = False,
    have_name: str = "the checkpoint",
    want_name: str = "the model",
) -> list[str]:
    """How `have` fails to fit `want`: missing leaves, extra leaves, wrong shapes.

    Leaves are anything with `.shape` (arrays, `jax.ShapeDtypeStruct`, orbax metadata); a
    leaf whose shape (or dtype) is unknown (None) matches any.

    Args:
      have: the tree found (e.g. a checkpoint's metadata).
      want: the tree asked for (e.g. the abstract model).
      limit: at most this many names per line.
      dtypes: compare dtypes as well as shapes.
      have_name: how the lines call `have`.
      want_name: how the lines call `want`.

    Returns:
      One line per kind of difference, empty when the trees fit; e.g.
      "the model has leaves the checkpoint lacks: 'params.lm_head'",
      "leaf 'params.embed' is (16, 8) float32 in the checkpoint but (16, 12) float32 in
      the model (1 more leaf differs)".
    """
    got, wanted = _flat(have, dtypes), _flat(want, dtypes)
    out = []
    if missing := sorted(set(wanted) - set(got)):
        out.append(f"{want_name} has leaves {have_name} lacks: {_listing(missing, limit)}")
    if extra := sorted(set(got) - set(wanted)):
        out.append(f"{have_name} has leaves {want_name} lacks: {_listing(extra, limit)}")
    wrong = []
    for name in sorted(set(got) & set(wanted)):
        (shape, dtype), (want_shape, want_dtype) = got[name], wanted[name]
        shape_differs = shape is not None and want_shape is not None and shape != want_shape
        dtype_differs = dtype is not None and want_dtype is not None and dtype != want_dtype
        if shape_differs or dtype_differs:
            wrong.append(
                f"{name!r} is {_spec(shape, dtype)} in {have_name} but "
                f"{_spec(want_shape, want_dtype)} in {want_name}"
            )
    if wrong:
        more = len(wrong) - limit
        out.append(
            "leaf "
            + "; leaf ".join(wrong[:limit])
            + (f" (and {more} more leaves differ)" if more > 0 else "")
        )
    return out
