"""GPTQ: post-training weight quantization with error feedback (Frantar et al. 2022).

Round-to-nearest (`quant.quantize`) rounds every weight on its own. GPTQ quantizes a dense
layer's inputs one at a time and spreads each rounding error over the inputs not yet
quantized, weighted by how the layer's calibration inputs X correlate, so that the
layer's output XW moves as little as possible. With H = X^T X (the paper's 2 X^T X; the
factor cancels) and U the upper Cholesky factor of H^-1, input i's error
e = (w_i - q_i) / U_ii updates w_j -= U_ij e for j > i. A group's scale (max|w| / qmax
over its `group_size` inputs) is computed when GPTQ reaches the group's first input, from
the weights as updated so far; that is the paper's grouping, and it keeps our layout
(inputs in their order, no act-order permutation), so the result is exactly the format
`quantize` writes and the kernels read.

`gptq(model, calibration)` runs the paper's sequential scheme on a GPT: the calibration
tokens go through the blocks one at a time; a block's dense layers are quantized from the
inputs that reach it through the already quantized blocks before it, then the block's
quantized output feeds the next. The token embedding is a lookup, not a product, and
keeps round-to-nearest (`embed_bits` as in `quantize`).

Shape letters: I input features (a kernel's flattened contracted axes), O output
features (flattened), G groups, L layers, B batch, T length.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int8

from llm_jax.compress.quant import _check, _get, _set, quantize
from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.models.layers import Einsum, num_inputs
from llm_jax.ops import quant as quant_ops


def inverse_hessian_factor(h: np.ndarray, percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """U, the upper Cholesky factor of (H + damp I)^-1 (so H^-1 = U^T U), in float64, and
    the mask of dead inputs (never nonzero in the calibration data: diag H = 0).

    Dead inputs get H_ii = 1 (their weights are zeroed by the caller; nothing depends on
    them); the damping is `percdamp` times the mean of diag H, as in the paper.
    """
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
    lower = np.linalg.cholesky(h)
    eye = np.eye(h.shape[0])
    lower_inv = np.linalg.solve(lower, eye)  # H^-1 = L^-T L^-1
    h_inv = lower_inv.T @ lower_inv
    return np.linalg.cholesky(h_inv).T, dead


def _group_scale(w: Float[Array, "g O"], qmax: int, scale_dtype) -> Float[Array, " O"]:
    """max|w| / qmax per output, rounded to the stored dtype (as `ops.quant.quantize`)."""
    amax = jnp.max(jnp.abs(w), axis=0)
    return jnp.where(amax > 0, amax / qmax, 1.0).astype(scale_dtype).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("bits", "group", "block", "scale_dtype"))
def _gptq_loop(w, u, *, bits: int, group: int, block: int, scale_dtype):
    """GPTQ over the inputs of w [I, O] in blocks of `block` inputs (the paper's lazy batch
    updates: a block's errors reach the later inputs in one [I, B] @ [B, O] product).

    Group scales read only inputs that have every earlier error applied: `block` divides
    `group` (a group starts at a block start, after all earlier blocks' updates) or
    `group` divides `block` (the group lies inside the block, which is kept current).
    """
    i_total, o = w.shape
    qmax = quant_ops.QMAX[bits]
    scale = jnp.ones((i_total // group, o), jnp.float32)
    rows = jnp.arange(i_total)

    def one_block(b, carry):
        w, q, scale = carry
        i1 = b * block
        if group > block:  # the group of this block starts here when i1 % group == 0
            s = _group_scale(jax.lax.dynamic_slice_in_dim(w, i1, group), qmax, scale_dtype)
            scale = jnp.where(i1 % group == 0, scale.at[i1 // group].set(s), scale)
        wb = jax.lax.dynamic_slice_in_dim(w, i1, block)  # [B, O]
        ub = jax.lax.dynamic_slice(u, (i1, i1), (block, block))  # [B, B]

        def one_input(j, inner):
            wb, qb, eb, scale = inner
            if group <= block:
                s = _group_scale(jax.lax.dynamic_slice_in_dim(wb, j, group), qmax, scale_dtype)
                scale = jnp.where(j % group == 0, scale.at[(i1 + j) // group].set(s), scale)
            s = scale[(i1 + j) // group]
            qj = jnp.clip(jnp.round(wb[j] / s), -qmax, qmax)
            err = (wb[j] - qj * s) / ub[j, j]  # [O]
            later = jnp.where(jnp.arange(block) > j, ub[j], 0.0)  # [B]
            wb = wb - later[:, None] * err[None, :]
            return wb, qb.at[j].set(qj), eb.at[j].set(err), scale

        zeros = jnp.zeros((block, o), jnp.float32)
        wb, qb, eb, scale = jax.lax.fori_loop(0, block, one_input, (wb, zeros, zeros, scale))
        u_rows = jax.lax.dynamic_slice_in_dim(u, i1, block)  # [B, I]
        update = jnp.where((rows >= i1 + block)[:, None], u_rows.T @ eb, 0.0)  # [I, O]
        w = jax.lax.dynamic_update_slice_in_dim(w - update, wb, i1, axis=0)
        return w, jax.lax.dynamic_update_slice_in_dim(q, qb, i1, axis=0), scale

    init = (w, jnp.zeros_like(w), scale)
    _, q, scale = jax.lax.fori_loop(0, i_total // block, one_block, init)
    return q.astype(jnp.int8), scale


def gptq_kernel(
    w: Float[Array, "I O"],
    h: Float[Array, "I I"],
    bits: int,
    group_size: int = 0,
    *,
    percdamp: float = 0.01,
    scale_dtype=jnp.float32,
) -> tuple[Int8[Array, "I O"], Float[Array, "G O"]]:
    """GPTQ of one kernel w [I, O] given its inputs' Hessian h = X^T X [I, I].

    Args:
      w: the float kernel, input axis first (as `ops.quant.quantize` takes it).
      h: X^T X of the layer's calibration inputs X [tokens, I] (any positive multiple).
      bits: 8 or 4.
      group_size: inputs per scale (must divide I); 0: one scale per output channel.
      percdamp: diagonal damping as a fraction of mean(diag h).
      scale_dtype: the stored scale's dtype; codes are rounded against the stored scale.

    Returns:
      (q, scale): the integer codes int8 [I, O] (unpacked) and scale [G, O] in scale_dtype;
      `ops.quant.pack_int4(q)` is the stored int4 kernel.
    """
    i_total = w.shape[0]
    groups = quant_ops.num_groups(i_total, bits, group_size)
    group = i_total // groups
    # Blocks of at most 128 inputs that nest with the groups (see `_gptq_loop`).
    block = math.gcd(group, 128) if group_size else math.gcd(i_total, 128)
    u, dead = inverse_hessian_factor(np.asarray(h), percdamp)
    w = jnp.where(jnp.asarray(dead)[:, None], 0.0, jnp.asarray(w, jnp.float32))
    q, scale = _gptq_loop(
        w,
        jnp.asarray(u, jnp.float32),
        bits=bits,
        group=group,
        block=block,
        scale_dtype=jnp.dtype(scale_dtype),
    )
    return q, scale.astype(scale_dtype)


def calibration_ids(cfg, calibration: Any) -> np.ndarray:
    """The calibration tokens as int32 [n, T]; ValueError naming the fix for bad input.

    Args:
      cfg: the model's config (vocab size, position limit).
      calibration: token ids [n, T] or [T] (an array, or an iterable of equal-length rows).
    """
    hint = "pass token ids [n, T] of text like the model's (e.g. 128 windows of 256 tokens)"
    if calibration is None:
        raise ValueError(f"GPTQ needs calibration data: {hint}.")
    try:
        ids = np.asarray(calibration if hasattr(calibration, "shape") else list(calibration))
    except ValueError as e:  # ragged rows
        raise ValueError(f"calibration rows differ in length ({e}); {hint}.") from None
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.size == 0 or ids.shape[1] < 2:
        raise ValueError(f"calibration of shape {ids.shape} has no token windows; {hint}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"calibration must be integer token ids, not {ids.dtype}; {hint}.")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(
            f"calibration token ids span [{low}, {high}] but the vocabulary is "
            f"[0, {cfg.vocab_size}); tokenize the text with the model's own tokenizer."
        )
    limit = cfg.max_position_embeddings if cfg.position == "learned" else 0
    if limit and ids.shape[1] > limit:
        raise ValueError(
            f"calibration windows of {ids.shape[1]} tokens exceed the model's "
            f"{limit} positions; cut them to at most {limit}."
        )
    return ids.astype(np.int32)


def text_windows(
    tokenizer, path: str | os.PathLike, n: int = 128, window: int = 256, *, head: float = 0.9
) -> np.ndarray:
    """Calibration tokens: `n` windows of `window` ids from seeded random places in the
    first `head` of a UTF-8 text (the rest can then serve as held-out text), int32 [n, window].

    Args:
      tokenizer: the model's tokenizer (anything with `encode(text) -> list[int]`).
      path: a UTF-8 text file.
      n: windows; fewer when the text has fewer distinct window starts.
      window: tokens per window.
      head: the share of the text the windows come from.
    """
    if n < 1 or window < 2:
        raise ValueError(f"calibration needs n >= 1 windows of >= 2 tokens, not {n} x {window}.")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"calibration text {path} not found.") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"calibration text {path} is not UTF-8 ({e.reason} at byte {e.start})."
        ) from None
    ids = np.asarray(tokenizer.encode(text[: int(head * len(text))]), np.int32)
    if len(ids) <= window:
        raise ValueError(
            f"calibration text {path} gives {len(ids)} tokens in its first {head:.0%}, fewer "
            f"than one window of {window}: give a longer text (e.g. a few hundred KB)."
        )
    rng = np.random.default_rng(0)
    starts = np.sort(rng.choice(len(ids) - window, size=min(n, len(ids) - window), replace=False))
    return np.stack([ids[s : s + window] for s in starts])


class _StackInput(Exception):
    """Carries what a model passed to its layer stack out of the forward pass."""

    def __init__(self, x: Array, kwargs: dict[str, Any]):
        super().__init__("stack input")
        self.x, self.kwargs = x, kwargs


class _StopAtStack(nnx.Module):
    """Stands in for a model's layer stack: the forward pass ends there with its input."""

    def __call__(self, x: Array, **kwargs: Any):
        raise _StackInput(x, kwargs)


def _stack_inputs(model: nnx.Module, ids: np.ndarray, batch_size: int) -> tuple[list, list]:
    """The hidden states [b, T, D] entering `model.layers` (and the keyword arguments the
    stack gets: mask, positions) for each batch of `batch_size` rows of `ids`."""
    stack = model.layers
    model.layers = _StopAtStack()
    xs, kwargs = [], []
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(jnp.asarray(ids[start : start + batch_size]))
            except _StackInput as got:
                xs.append(got.x)
                kwargs.append(got.kwargs)
    finally:
        model.layers = stack
    return xs, kwargs


def _flat_inputs(equation: str, x: Array) -> Float[Array, "tokens I"]:
    """x's rows as [tokens, I]: the kernel's contracted axes last, in the kernel's order."""
    lhs, rhs = equation.split("->")[0].split(",")
    contracted = rhs[: num_inputs(equation)]
    rest = "".join(c for c in lhs if c not in contracted)
    return jnp.einsum(f"{lhs}->{rest}{contracted}", x).reshape(
        -1, math.prod(x.shape[lhs.index(c)] for c in contracted)
    )


class _Tap:
    """An `Einsum` that also records X^T X [I, I] of its inputs into `sink[path]`."""

    def __init__(self, layer: Einsum, path: tuple, sink: dict):
        self.layer, self.path, self.sink = layer, path, sink

    def __call__(self, x: Array, **kwargs: Any) -> Array:
        flat = _flat_inputs(self.layer.equation, x.astype(jnp.float32))
        self.sink[self.path] = flat.T @ flat
        return self.layer(x, **kwargs)


def einsum_paths(module: nnx.Module) -> list[tuple]:
    """Paths of the `Einsum` layers inside `module`, in graph order."""
    return [path for path, node in nnx.iter_graph(module) if isinstance(node, Einsum)]


def _run_block(graphdef, state, x, kwargs) -> tuple[Array, dict[tuple, Array]]:
    """One block's output for x [b, T, D] and X^T X of every dense layer's input."""
    block = nnx.merge(graphdef, state)
    sink: dict[tuple, Array] = {}
    for path in einsum_paths(block):
        parent = _get_attr(block, path[:-1])
        setattr(parent, path[-1], _Tap(getattr(parent, path[-1]), path, sink))
    y, _ = block(x, **kwargs)
    return y, sink


def _gptq_einsum(w: Array, kernel_shape: tuple, n_in: int, h: np.ndarray, settings: dict):
    """GPTQ of one layer's kernel [in..., out...]: (stored kernel [I / pack, O...], scale
    [G, O...], the dequantized float kernel [in..., out...] the next blocks see)."""
    i_total = math.prod(kernel_shape[:n_in])
    codes, scale = gptq_kernel(w.reshape(i_total, -1), h, **settings)  # [I, O], [G, O]
    return _store(codes, scale, settings["bits"], kernel_shape, n_in)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _store(codes, scale, bits: int, kernel_shape: tuple, n_in: int):
    """GPTQ's codes [I, O] and scale [G, O] in the layout `quantize` writes, and the
    dequantized kernel [in..., out...]."""
    out_shape = kernel_shape[n_in:]
    stored = quant_ops.pack_int4(codes) if bits == 4 else codes
    w_hat = quant_ops.dequantize(stored, scale, bits).reshape(kernel_shape)
    return stored.reshape(-1, *out_shape), scale.reshape(-1, *out_shape), w_hat


def _hessians(run, state, xs: list, kwargs: list) -> dict[tuple, np.ndarray]:
    """X^T X of every dense layer's input in one block, summed over the batches (float64)."""
    total: dict[tuple, np.ndarray] = {}
    for x, kw in zip(xs, kwargs, strict=True):
        _, sink = run(state, x, kw)
        for path, h in jax.device_get(sink).items():
            total[path] = total.get(path, 0.0) + np.asarray(h, np.float64)
    return total


def _quantize_block(graphdef, state, hessians: dict, settings: dict) -> dict[tuple, tuple]:
    """GPTQ every dense layer of one block; its float kernels in `state` become the
    dequantized ones (in place). Returns {path: (stored kernel, scale)}."""
    block = nnx.merge(graphdef, state)
    pure = nnx.to_pure_dict(state)
    out = {}
    for path in einsum_paths(block):
        layer = _get_attr(block, path)
        n_in = num_inputs(layer.equation)
        w = _get(pure, path)["kernel"]
        stored, scale, w_hat = _gptq_einsum(w, layer.kernel_shape, n_in, hessians[path], settings)
        _set(pure, path, {"kernel": w_hat.astype(w.dtype)})
        out[path] = (stored, scale)
    nnx.replace_by_pure_dict(state, pure)
    return out


def _get_attr(module: nnx.Module, path: tuple) -> Any:
    for key in path:
        module = getattr(module, key)
    return module


def _gptq_head(model: nnx.Module, xs: list, settings: dict, qparams: dict) -> None:
    """GPTQ of an untied output head from the last block's (quantized-path) outputs."""
    head, h = model.lm_head, 0.0

    @nnx.jit
    def head_hessian(model, x):
        hidden = x if model.final_norm is None else model.final_norm(x)
        flat = _flat_inputs(head.equation, hidden.astype(jnp.float32))
        return flat.T @ flat

    for x in xs:
        h = h + np.asarray(head_hessian(model, x), np.float64)
    n_in = num_inputs(head.equation)
    stored, scale, _ = _gptq_einsum(head.kernel[...], head.kernel_shape, n_in, h, settings)
    _set(qparams, ("lm_head",), {"kernel": stored, "scale": scale})


def gptq(
    model: nnx.Module,
    calibration: Any,
    bits: int = 4,
    group_size: int | None = None,
    embed_bits: int = 0,
    *,
    percdamp: float = 0.01,
    batch_size: int = 8,
) -> nnx.Module:
    """`model` quantized like `quantize(model, bits, group_size, embed_bits)`, with every
    dense kernel of the blocks (and an untied head) chosen by GPTQ on `calibration`.

    Args:
      model: a float GPT (no LoRA adapters).
      calibration: token ids [n, T] (or [T], or an iterable of equal-length rows) of text
        like the model's use; hold the evaluation text out of it.
      bits, group_size, embed_bits: as in `quantize` (the stored format is the same).
      percdamp: damping of each Hessian, as a fraction of its mean diagonal.
      batch_size: calibration rows per forward pass (bounds memory, not the result).

    Returns:
      A model of the same tree, dtypes and config as `quantize`'s.

    Raises:
      ValueError: what `quantize` rejects, a model other than GPT, missing or bad
        calibration ids (empty, not integers, outside the vocabulary, too long), a
        percdamp or batch_size out of range; all before any computation.
    """
    group_size = _check(model, bits, group_size)
    if model.cfg.family != "gpt" or model.layers.shared:
        raise ValueError("gptq runs on GPT models (unshared layers); use quantize for others.")
    if not percdamp > 0 or batch_size < 1:
        raise ValueError(
            f"need percdamp > 0 (e.g. 0.01) and batch_size >= 1; got {percdamp}, {batch_size}."
        )
    ids = calibration_ids(model.cfg, calibration)
    qmodel = quantize(model, bits, group_size, embed_bits)  # the format; embedding RTN
    qparams = params_of(qmodel)
    scale_dtype = jnp.dtype(model.cfg.param_dtype)
    settings = dict(bits=bits, group_size=group_size, percdamp=percdamp, scale_dtype=scale_dtype)
    # A float copy whose blocks follow GPTQ; its embedding is the quantized one, so the
    # first block calibrates on what the quantized model feeds it.
    fparams = params_of(model)
    table_t = jax.jit(quant_ops.dequantize, static_argnums=2)(
        qmodel.embed.embedding[...], qmodel.embed.scale[...], qmodel.embed.quant.bits
    )  # [E, V]
    fparams["embed"]["embedding"] = table_t.T.astype(fparams["embed"]["embedding"].dtype)
    fmodel = model_from_params(model.cfg, fparams)
    xs, kwargs = _stack_inputs(fmodel, ids, batch_size)
    graphdef, stacked = nnx.split(fmodel.layers.blocks)
    run = jax.jit(functools.partial(_run_block, graphdef))
    per_layer = []
    for layer in range(model.cfg.num_layers):
        state = jax.tree.map(lambda a: a[layer], stacked)  # noqa: B023 (used at once)
        hessians = _hessians(run, state, xs, kwargs)
        per_layer.append(_quantize_block(graphdef, state, hessians, settings))
        # The next block calibrates on what this quantized block outputs.
        xs = [run(state, x, kw)[0] for x, kw in zip(xs, kwargs, strict=True)]
    for path in per_layer[0]:
        kernels, scales = zip(*(layer[path] for layer in per_layer), strict=True)
        stacked_q = {"kernel": jnp.stack(kernels), "scale": jnp.stack(scales)}
        _set(qparams, ("layers", "blocks", *path), stacked_q)
    if fmodel.lm_head is not None:
        _gptq_head(fmodel, xs, settings, qparams)
    return model_from_params(qmodel.cfg, qparams)
