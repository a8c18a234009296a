"""XLA:CPU-specific layouts and program forms; every one applies only on the CPU backend.

The models are written for any backend. XLA:CPU, though, executes a few patterns with
whole-tensor copies that GPU/TPU compilers fold away, and decoding (many small steps, each
reading every weight once) is where those copies dominate. The four workarounds live
here and nowhere else; `benchmarks/README.md` has the measurements behind them.

1. Contraction order (`kernel_einsum`). `jnp.einsum` contracts several axes in alphabetical
   order of their letters ('BTNH,NHD->BTD' becomes a dot over (H, N)); XLA:CPU then
   transposes the whole [N, H, D] kernel on every call. Contracting in the kernel's own
   order reads it in place.
2. Head-major KV cache: keys [B, K, S, H] and values [B, K, H, S] instead of [B, S, K, H].
   Those are the layouts the attention products read, each contracting its innermost
   axis; kept length-major, XLA:CPU copies every layer's cache into them at every decode
   step. `models.cache.LayerKV` stores either layout (`heads_major`).
3. The per-layer "loop form" of a decoder (`cut_layers` / `restack`). The models keep a
   layer stack's parameters stacked [L, ...] and slice layer i per call; XLA:CPU copies
   each slice before its matmuls. The loop form cuts the L slices once, outside the
   compiled loop, and re-stacks them inside each step with `jnp.stack`, which XLA folds
   with the model's static slice back to the slice itself; so layers run unrolled and the
   weights exist twice while the decoder lives. The KV cache is carried the same way, so a
   step updates one layer's buffer in place instead of rebuilding the [L, ...] cache;
   `ordered_after` makes each write follow its layer's reads, so XLA updates the
   loop-carried buffer in place instead of copying it twice per step.
4. Output-major dense kernels in the loop form ([out..., in...], `to_output_major`): a
   row-vector product reads such a kernel contracting its innermost axes, up to 1.6x
   faster than the [in..., out...] layout the models train with. The decoders flag their
   copy of each `Einsum` (`output_major`) and transpose its kernel once, when cut.

On GPU/TPU none of this applies: decoders scan over the stacked weights directly (no
unrolled layers, no second copy), the cache is length-major and einsums are plain.
Batch-1 decoding of GPT-2 small went from 19.6 to 14.3 ms/token with the cache and kernel
layouts of 2 and 4 and the ordered writes (`benchmarks/peers.py`, the same run's KerasHub
at 25.3 ms/token).
`use_cpu_tricks` is the one switch; the decoder adapters take it as a flag so both paths
can be tested on one machine.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from llm_jax.kernels import qmatmul


def use_cpu_tricks(backend: str | None = None) -> bool:
    """Whether the XLA:CPU workarounds apply on `backend` (default: JAX's default backend)."""
    return (jax.default_backend() if backend is None else backend) == "cpu"


def kernel_einsum(equation: str, x: Array, kernel: Array) -> Array:
    """`jnp.einsum(equation, x, kernel)` for an 'in,kernel->out' equation without batch
    axes, contracting several axes in the kernel's order (workaround 1)."""
    ins, out = equation.split("->")
    lhs, rhs = ins.split(",")
    contract = [c for c in rhs if c in lhs and c not in out]
    if len(contract) < 2 or any(c in lhs and c in out for c in rhs):
        return jnp.einsum(equation, x, kernel)
    dims = ([lhs.index(c) for c in contract], [rhs.index(c) for c in contract])
    y = jax.lax.dot_general(x, kernel, (dims, ((), ())))
    got = [c for c in lhs if c not in contract] + [c for c in rhs if c not in contract]
    return y if got == list(out) else jnp.transpose(y, [got.index(c) for c in out])


def dense_einsum(equation: str, x: Array, kernel: Array) -> Array:
    """The einsum of a dense layer: `kernel_einsum` on CPU, `jnp.einsum` elsewhere."""
    if use_cpu_tricks():
        return kernel_einsum(equation, x, kernel)
    return jnp.einsum(equation, x, kernel)


def to_heads_major(x: Array) -> Array:
    """Keys [..., B, S, K, H] -> [..., B, K, S, H] (workaround 2)."""
    return jnp.swapaxes(x, -3, -2)


def from_heads_major(x: Array) -> Array:
    """Keys [..., B, K, S, H] -> [..., B, S, K, H]: a transpose XLA folds into the products."""
    return jnp.swapaxes(x, -3, -2)


def to_values_major(x: Array) -> Array:
    """Values [..., B, S, K, H] -> [..., B, K, H, S] (workaround 2): probs·V contracts S,
    which XLA:CPU wants innermost, else it transposes every layer's values per step."""
    return jnp.moveaxis(x, -3, -1)


def from_values_major(x: Array) -> Array:
    """Values [..., B, K, H, S] -> [..., B, S, K, H], folded into the product."""
    return jnp.moveaxis(x, -1, -3)


def ordered_after(read: Array, *xs: Array) -> tuple[Array, ...]:
    """`xs` unchanged, but computed from `read` as far as XLA can tell (workaround 3).

    A decode step writes each layer's cache in place after attending over it. Unless the
    write depends on the attention's result, XLA:CPU cannot order the reads first and
    copies the loop-carried cache twice per step (a whole-cache copy per tensor per layer:
    most of the non-matmul time of batch-1 decoding). Adding a zero made from one element
    of `read` orders them; `nan_to_num` keeps the zero a zero whatever `read` holds, and
    XLA does not fold a floating-point multiply by zero.
    """
    zero = jnp.nan_to_num(read.reshape(-1)[0]) * 0
    return tuple(x + zero.astype(x.dtype) for x in xs)


def to_output_major(kernel: Array, n_in: int) -> Array:
    """A dense kernel [in..., out...] with `n_in` input axes stored [out..., in...]
    (workaround 4). A row-vector product that contracts a kernel's innermost axes streams
    it at XLA:CPU's full dot bandwidth; contracting the leading axes runs up to 1.6x slower
    (fc2 of GPT-2 small: 353 vs 220 us). XLA:CPU does not fold a transpose back into the
    dot, so the layer computes with the stored form itself (`output_major_einsum`)."""
    return jnp.transpose(kernel, [*range(n_in, kernel.ndim), *range(n_in)])


def output_major_einsum(equation: str, x: Array, kernel: Array) -> Array:
    """`jnp.einsum(equation, x, k)` for an 'in,kernel->out' equation whose kernel letters
    are [in..., out...], given `kernel` = `to_output_major(k)`.

    The product runs as one [M, I] x [O, I] product on the flattened kernel (a bitcast):
    given a kernel of rank > 2, XLA:CPU's dot canonicalization would transpose it again.
    For 2-16 rows (speculative verification, batch 8, beams) it is the float kernel of
    `llm_jax.kernels.qmatmul`, which reads these weights 1.3-2x faster than XLA's dot."""
    ins, out = equation.split("->")
    lhs, rhs = ins.split(",")
    n_in = sum(c in lhs and c not in out for c in rhs)
    k_in, k_out = rhs[:n_in], rhs[n_in:]
    free = [c for c in lhs if c not in k_in]
    xt = jnp.transpose(x, [lhs.index(c) for c in free + list(k_in)])
    lead = xt.shape[: len(free)]
    w = kernel.reshape(math.prod(kernel.shape[: len(k_out)]), -1)
    y = qmatmul.float_matmul(xt.reshape(math.prod(lead), w.shape[1]), w)
    y = y.reshape(*lead, *kernel.shape[: len(k_out)])
    got = free + list(k_out)
    return y if got == list(out) else jnp.transpose(y, [got.index(c) for c in out])


def _is_slices(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, jax.Array | jax.ShapeDtypeStruct) for a in x)


def cut_layers(tree: Any, kernel_inputs: dict[tuple[str, ...], int] | None = None) -> Any:
    """Every [L, ...] array leaf as a tuple of its L slices (workaround 3). The leaves at
    the paths of `kernel_inputs` (e.g. ('attn', 'q', 'kernel'): dense kernels, with their
    number of input axes) are cut into `to_output_major` slices (workaround 4)."""
    kernel_inputs = kernel_inputs or {}

    def cut(path, x):
        n_in = kernel_inputs.get(tuple(str(getattr(k, "key", k)) for k in path))
        slices = tuple(x[i] for i in range(x.shape[0]))
        return slices if n_in is None else tuple(to_output_major(w, n_in) for w in slices)

    return jax.tree_util.tree_map_with_path(cut, tree)


def restack(tree: Any) -> Any:
    """The inverse of `cut_layers` (kernels stay output-major); XLA folds a static slice of
    the result to the slice."""
    return jax.tree.map(lambda x: jnp.stack(x) if _is_slices(x) else x, tree, is_leaf=_is_slices)
