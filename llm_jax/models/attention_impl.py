"""Which attention implementation runs: the XLA reference, cuDNN's fused kernel or Pallas.

`model.attention_impl` chooses among

- `xla`: `ops.dot_product_attention`, the einsum-softmax-einsum reference; any mask, bias,
  dropout, dtype and backend.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash attention
  on NVIDIA GPUs: bfloat16/float16, head dim a multiple of 8 and at most 128 (256 from
  Hopper on), no attention dropout and no additive bias. Causal masks go in as cuDNN's own
  causal mask type, segment and padding masks as a boolean mask (cuDNN folds it into a
  bias), grouped-query attention natively.
- `pallas`: the Pallas TPU splash-attention kernel shipped with JAX
  (`jax.experimental.pallas.ops.tpu.splash_attention`). It reads the mask's structure
  (causal + segment ids, see `AttentionMask`), never a dense [T, S] mask, and takes K < N
  key/value heads natively. Needs T and S multiples of 128 (its block size), no bias and no
  dropout. Off TPU it runs in Pallas interpret mode (slow; what the CPU tests use). Splash
  was chosen over the older `flash_attention` kernel in the same package because splash
  handles grouped-query attention without repeating keys/values and skips fully masked
  blocks of a causal mask.
- `auto`: cudnn on GPU, pallas on TPU, xla elsewhere (so on CPU exactly today's program).

A call the chosen kernel cannot serve (a dense mask from a KV cache, T5's bias, dropout, a
dtype or head dim outside its limits, the wrong backend) runs the XLA reference instead,
and the reason is printed once per process. The kernels give an all-zero output row to a
query that attends to nothing (segment id 0, padding), as the reference does.

Shape letters: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from llm_jax import ops
from llm_jax.models.config import ATTENTION_IMPLS
from llm_jax.parallel.rules import active_mesh_and_rules, logical_to_spec

_AUTO = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "pallas"}
SPLASH_BLOCK = 128  # the smallest block the splash kernel tiles T and S with
_said: set[str] = set()
# The platform programs are compiled for, when it is not JAX's default backend (a memory
# plan compiles for a TPU topology from a CPU host); None: the default backend.
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)
# The implementations attention calls traced in a `recording_used()` context really ran (a
# call may fall back to xla), e.g. what a memory plan reports; None: not recording.
_USED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("used", default=None)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Within this context `auto` and the kernels' checks pick for `platform` ("tpu",
    "gpu", "cpu") instead of JAX's default backend: compiling ahead of time for devices
    this host does not have."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


@contextlib.contextmanager
def recording_used() -> Iterator[set[str]]:
    """Yield a set that collects the implementation each attention call traced within this
    context ended up with, after every fallback."""
    used: set[str] = set()
    token = _USED.set(used)
    try:
        yield used
    finally:
        _USED.reset(token)


def _used(impl: str) -> str:
    if (used := _USED.get()) is not None:
        used.add(impl)
    return impl


def current_platform() -> str:
    """The platform attention is being compiled for (see `target_platform`)."""
    return _TARGET.get() or jax.default_backend()


def _say_once(message: str) -> None:
    """Print `message` to stderr the first time it comes up in this process (at trace time)."""
    if message not in _said:
        _said.add(message)
        print(f"attention: {message}", file=sys.stderr)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["dense", "q_segments", "kv_segments"],
    meta_fields=["causal"],
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """A self-attention mask kept with its structure, so fused kernels need not read it.

    Attributes:
      dense: the boolean mask [#B, 1, T, S] the XLA reference uses (True = may attend).
      q_segments, kv_segments: segment ids [B, T] and [B, S] (0 = padding), or None.
      causal: whether query i sees only keys j <= i.
    """

    dense: Bool[Array, "#B 1 T S"]
    q_segments: Int[Array, "B T"] | None
    kv_segments: Int[Array, "B S"] | None
    causal: bool

    @classmethod
    def of(cls, length: int, *, causal: bool, segment_ids: Int[Array, "B T"] | None = None):
        """The causal and/or segment mask of a sequence of `length` tokens; the dense part
        is exactly `ops.combine_masks(ops.causal_mask(T), ops.segment_mask(segment_ids))`
        (without the causal term when `causal` is False)."""
        segments = None if segment_ids is None else ops.segment_mask(segment_ids)
        dense = ops.combine_masks(ops.causal_mask(length) if causal else None, segments)
        if dense is None:
            dense = ops.bidirectional_mask(length=length)
        return cls(dense, segment_ids, segment_ids, causal)


def resolve(impl: str, backend: str | None = None) -> str:
    """The implementation `impl` means on `backend` (default: JAX's): `auto` picks cudnn on
    GPU, pallas on TPU and xla elsewhere; the others mean themselves."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {list(ATTENTION_IMPLS)}.")
    if impl != "auto":
        return impl
    backend = current_platform() if backend is None else backend
    return _AUTO.get(backend, "xla")


def _cudnn_head_dim_limit() -> int:
    """cuDNN flash attention's largest head dim: 256 from Hopper (sm90) on, else 128."""
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if tuple(int(c) for c in str(capability).split(".")[:2]) >= (9, 0) else 128


def why_not(impl: str, q, k, mask, bias, dropout: bool, backend: str) -> str | None:
    """Why `impl` cannot run this call (a message naming the limit), or None if it can."""
    if impl == "xla":
        return None
    if bias is not None:
        return f"{impl} takes no additive bias (T5's relative positions); using xla."
    if dropout:
        return f"{impl} has no attention-probability dropout; using xla while it is on."
    if impl == "cudnn":
        if backend not in ("gpu", "cuda"):
            return f"cudnn needs an NVIDIA GPU (backend is {backend}); using xla."
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cudnn runs bfloat16/float16, not {q.dtype}; set model.dtype=bfloat16."
        limit, h = _cudnn_head_dim_limit(), q.shape[-1]
        if h % 8 or h > limit:
            return f"cudnn needs head_dim a multiple of 8 and <= {limit}, got {h}; using xla."
        return None
    if not isinstance(mask, AttentionMask | None):
        return "pallas needs a causal/segment mask, not a dense one (KV-cache decoding); xla."
    t, s = q.shape[1], k.shape[1]
    if t % SPLASH_BLOCK or s % SPLASH_BLOCK:
        return f"pallas needs T and S multiples of {SPLASH_BLOCK}, got T={t}, S={s}; using xla."
    return None


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: AttentionMask | Bool[Array, "#B #N T S"] | None = None,
    bias: Float[Array, "#B #N T S"] | None = None,
    *,
    impl: str = "auto",
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> Float[Array, "B T N H"]:
    """Scaled dot-product attention by `impl` (see the module docstring).

    Args:
      q, k, v: [B, T, N, H] and [B, S, K, H], K dividing N.
      mask: an `AttentionMask`, a boolean mask broadcastable to [B, N, T, S], or None.
      bias: additive logit bias (forces xla).
      impl: auto | xla | cudnn | pallas.
      scale, dropout_rate, dropout_rng: as in `ops.dot_product_attention`.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    backend = current_platform()
    chosen = resolve(impl, backend)
    if impl == "auto":
        _say_once(f"attention_impl=auto picked {chosen} on {backend}.")
    dropout = dropout_rng is not None and dropout_rate > 0.0
    reason = why_not(chosen, q, k, mask, bias, dropout, backend)
    if reason is not None:
        _say_once(reason)
        chosen = "xla"
    if chosen == "cudnn":
        try:
            out = cudnn_attention(q, k, v, mask, scale=scale)
            _used("cudnn")
            return out
        except NotImplementedError as e:  # a limit of this cuDNN build not checked above
            _say_once(f"cudnn cannot run this call ({e}); using xla.")
    elif chosen == "pallas":
        _used("pallas")
        return splash_attention(q, k, v, mask, scale=scale, interpret=backend != "tpu")
    dense = mask.dense if isinstance(mask, AttentionMask) else mask
    _used("xla")
    return ops.dot_product_attention(
        q,
        k,
        v,
        mask=dense,
        bias=bias,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )


def _zero_empty_rows(out: Float[Array, "B T N H"], mask) -> Float[Array, "B T N H"]:
    """Zero the rows of queries that attend to nothing, as the reference does (a kernel
    gives them an average of masked values, or of their own padding segment)."""
    if isinstance(mask, AttentionMask):
        if mask.q_segments is None:
            return out
        has_keys = mask.q_segments != 0  # [B, T]
    elif mask is None:
        return out
    else:
        has_keys = jnp.any(mask, axis=(1, 3))  # [B, T]; any head, any key
    return jnp.where(has_keys[:, :, None, None], out, jnp.zeros((), out.dtype))


def cudnn_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: AttentionMask | Bool[Array, "#B #N T S"] | None,
    *,
    scale: float | None = None,
) -> Float[Array, "B T N H"]:
    """cuDNN flash attention: a causal `AttentionMask` as cuDNN's causal mask type, its
    segments (and any dense mask) as a boolean [B, 1, T, S] mask."""
    causal, dense = False, mask
    if isinstance(mask, AttentionMask):
        causal = mask.causal
        dense = None if mask.q_segments is None else ops.segment_mask(mask.q_segments)
    if dense is not None:
        dense = jnp.broadcast_to(dense, (q.shape[0], dense.shape[1], q.shape[1], k.shape[1]))
    out = jax.nn.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        mask=dense,
        scale=scale,
        is_causal=causal,
        implementation="cudnn",
    )
    return _zero_empty_rows(out, mask)


def _splash_kernel(n: int, t: int, s: int, causal: bool, interpret: bool):
    """The splash-attention kernel for one batch row: (q [N, T, H], k, v [K, S, H],
    segment ids) -> [N, T, H]. Blocks of up to 512 that divide T and S."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    head = masks.CausalMask((t, s)) if causal else masks.FullMask((t, s))
    bq = max(b for b in (512, 256, 128) if t % b == 0)
    bkv = max(b for b in (512, 256, 128) if s % b == 0)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return splash.make_splash_mha(
        masks.MultiHeadMask([head] * n),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    ), splash.SegmentIds


def splash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: AttentionMask | None,
    *,
    scale: float | None = None,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
    """Pallas splash attention over the batch (vmapped), split over the batch axes of the
    active mesh with `shard_map` (a Pallas call cannot be partitioned by XLA itself)."""
    b, t, n, h = q.shape
    s = k.shape[1]
    causal = mask is not None and mask.causal
    kernel, segment_ids = _splash_kernel(n, t, s, causal, interpret)
    scale = h**-0.5 if scale is None else scale
    qs = None if mask is None else mask.q_segments
    kvs = None if mask is None else mask.kv_segments

    def one_row(q1, k1, v1, qs1, kvs1):  # [T, N, H], [S, K, H], [T], [S]
        ids = None if qs1 is None else segment_ids(qs1, kvs1)
        out = kernel(
            jnp.swapaxes(q1 * jnp.asarray(scale, q1.dtype), 0, 1),
            jnp.swapaxes(k1, 0, 1),
            jnp.swapaxes(v1, 0, 1),
            segment_ids=ids,
        )  # [N, T, H]
        return jnp.swapaxes(out, 0, 1)

    def rows(q, k, v, qs, kvs):
        return jax.vmap(one_row)(q, k.astype(q.dtype), v.astype(q.dtype), qs, kvs)

    active = active_mesh_and_rules()
    if active is not None and active[0].size > 1:
        mesh, rules = active
        batch = logical_to_spec(("batch",), (b,), rules, mesh)[0]
        spec = jax.sharding.PartitionSpec(batch)
        seg = None if qs is None else spec
        # check_vma=False: the kernel's output shapes carry no varying-axes annotation.
        rows = jax.shard_map(
            rows, mesh=mesh, in_specs=(spec, spec, spec, seg, seg), out_specs=spec, check_vma=False
        )
    out = rows(q, k, v, qs, kvs).astype(q.dtype)
    return _zero_empty_rows(out, mask)


__all__ = [
    "ATTENTION_IMPLS",
    "AttentionMask",
    "attention",
    "cudnn_attention",
    "recording_used",
    "resolve",
    "splash_attention",
    "why_not",
]
