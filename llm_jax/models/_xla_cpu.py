"""XLA:CPU-specific layouts and program forms; every one applies only on the CPU backend.

The models are written for any backend. XLA:CPU, though, executes a few patterns with
whole-tensor copies that GPU/TPU compilers fold away, and decoding (many small steps, each
reading every weight once) is where those copies dominate. The three workarounds live
here and nowhere else; `benchmarks/README.md` has the measurements behind them.

1. Contraction order (`kernel_einsum`). `jnp.einsum` contracts several axes in alphabetical
   order of their letters ('BTNH,NHD->BTD' becomes a dot over (H, N)); XLA:CPU then
   transposes the whole [N, H, D] kernel on every call. Contracting in the kernel's own
   order reads it in place.
2. Head-major KV cache ([B, K, S, H] instead of [B, S, K, H]). That is the layout the
   attention products read; kept length-major, XLA:CPU copies every layer's cache into it
   at every decode step. `models.cache.LayerKV` stores either layout (`heads_major`).
3. The per-layer "loop form" of a decoder (`cut_layers` / `restack`). The models keep a
   layer stack's parameters stacked [L, ...] and slice layer i per call; XLA:CPU copies
   each slice before its matmuls. The loop form cuts the L slices once, outside the
   compiled loop, and re-stacks them inside each step with `jnp.stack`, which XLA folds
   with the model's static slice back to the slice itself; so layers run unrolled and the
   weights exist twice while the decoder lives. The KV cache is carried the same way, so a
   step updates one layer's buffer in place instead of rebuilding the [L, ...] cache.

On GPU/TPU none of this applies: decoders scan over the stacked weights directly (no
unrolled layers, no second copy), the cache is length-major and einsums are plain.
`use_cpu_tricks` is the one switch; the decoder adapters take it as a flag so both paths
can be tested on one machine.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array


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
    """[..., B, S, K, H] -> [..., B, K, S, H] (workaround 2)."""
    return jnp.swapaxes(x, -3, -2)


def from_heads_major(x: Array) -> Array:
    """[..., B, K, S, H] -> [..., B, S, K, H]: a transpose XLA folds into the products."""
    return jnp.swapaxes(x, -3, -2)


def _is_slices(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, jax.Array | jax.ShapeDtypeStruct) for a in x)


def cut_layers(tree: Any) -> Any:
    """Every [L, ...] array leaf as a tuple of its L slices (workaround 3)."""
    return jax.tree.map(lambda x: tuple(x[i] for i in range(x.shape[0])), tree)


def restack(tree: Any) -> Any:
    """The inverse of `cut_layers`; XLA folds a static slice of the result to the slice."""
    return jax.tree.map(lambda x: jnp.stack(x) if _is_slices(x) else x, tree, is_leaf=_is_slices)
