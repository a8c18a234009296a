"""Flax NNX layers shared by GPT, BERT and T5. They own parameters and call `llm_jax.ops`.

Every parameter carries logical axis names (its `out_sharding` metadata), from this set:
`vocab, embed, heads, kv_heads, kv, mlp, layers, positions, types, buckets, classes,
lora_rank` (the rank axis of LoRA factors; no rules table shards it).
A rules table (see `llm_jax.parallel`) maps them onto mesh axes; nothing here is sharded
eagerly, so modules build the same with or without a mesh.

Shape letters: B batch, T query length, S key length, D model dim, N query heads,
K key/value heads, H head dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from llm_jax import ops
from llm_jax.kernels import qmatmul
from llm_jax.models import _xla_cpu
from llm_jax.models import attention_impl as attn
from llm_jax.models.cache import LayerKV, attend_beside_cache
from llm_jax.models.config import ModelConfig
from llm_jax.models.init import InitScheme
from llm_jax.models.inputs import split_key
from llm_jax.ops import quant as quant_ops
from llm_jax.ops.attention import attention_beside_cache
from llm_jax.parallel.rules import constrain

Axes = tuple[str | None, ...]


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    axes: Axes,
    *,
    std: float | None = None,
    value: float = 0.0,
    dtype: Any = jnp.float32,
    key: jax.Array | None = None,
) -> nnx.Param:
    """A parameter with logical axis names: N(0, std^2) when `std` is given, else constant.
    The normal draw uses `key` when given, else the next `rngs.params()` key."""
    if len(shape) != len(axes):
        raise ValueError(f"parameter shape {shape} and axes {axes} differ in rank.")
    if std is None:
        init = jnp.full(shape, value, dtype)
    else:
        key = rngs.params() if key is None else key
        init = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return nnx.Param(init, out_sharding=axes, eager_sharding=False)


@dataclasses.dataclass(frozen=True)
class LoRA:
    """A LoRA adapter's settings (see `ops.lora_update`): rank r, alpha, input dropout."""

    rank: int
    alpha: float
    dropout: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_keys(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """`n` keys for the LoRA dropouts of a module's dense layers, or Nones in eval.

    Derived with `fold_in` from the key the module already gets, so that every other
    dropout key of the model is what it was without LoRA.
    """
    return [None] * n if rng is None else [jax.random.fold_in(rng, i) for i in range(n)]


def _lora_factors(
    equation: str,
    shape: tuple[int, ...],
    axes: Axes,
    lora: LoRA,
    param_dtype: Any,
    key: jax.Array,
) -> tuple[nnx.Param, nnx.Param]:
    """A [in..., R] and B [R, out...] of a dense layer with kernel `shape` [in..., out...].

    A is drawn as PEFT draws it (torch's kaiming_uniform_ with a=sqrt(5): U(+-1/sqrt(in)));
    B is zero, so the adapted layer starts as the base layer exactly.
    """
    a_equation = ops.lora_equations(equation)[0]  # e.g. 'BTD,DR->BTR'
    n_in = len(a_equation.split("->")[0].split(",")[1]) - 1
    bound = math.prod(shape[:n_in]) ** -0.5
    a = jax.random.uniform(key, (*shape[:n_in], lora.rank), jnp.float32, -bound, bound)
    lora_a = nnx.Param(
        a.astype(param_dtype), out_sharding=(*axes[:n_in], "lora_rank"), eager_sharding=False
    )
    lora_b = param(None, (lora.rank, *shape[n_in:]), ("lora_rank", *axes[n_in:]), dtype=param_dtype)
    return lora_a, lora_b


@dataclasses.dataclass(frozen=True)
class Quant:
    """Weight-only quantization settings (see `llm_jax.ops.quant`): 8 or 4 bits, and the
    inputs per scale (0: one scale per output channel)."""

    bits: int
    group_size: int = 0
    embed_bits: int = 0  # the token embedding's bits (per channel); 0: `bits`, `group_size`

    @property
    def pack(self) -> int:
        """Values per stored int8 byte."""
        return 2 if self.bits == 4 else 1

    def for_embedding(self) -> Quant:
        """The settings of the token embedding table."""
        return Quant(self.embed_bits) if self.embed_bits else self


def quant_of(cfg: ModelConfig) -> Quant | None:
    """The config's quantization settings, or None for float weights."""
    if not cfg.quant_bits:
        return None
    return Quant(cfg.quant_bits, cfg.quant_group_size, cfg.quant_embed_bits)


def _quantized_kernel(
    shape: tuple[int, ...], n_in: int, axes: Axes, quant: Quant, param_dtype: Any
) -> tuple[nnx.Param, nnx.Param]:
    """The int8 `kernel` [I / pack, O...] and `scale` [G, O...] of a kernel [in..., out...]
    whose first `n_in` axes (flattened to I) are contracted; ValueError if G does not fit."""
    num_inputs = math.prod(shape[:n_in])
    groups = quant_ops.num_groups(num_inputs, quant.bits, quant.group_size)
    out_shape, out_axes = shape[n_in:], axes[n_in:]
    # Several input axes flatten to one, which no single logical name describes.
    in_axis = axes[0] if n_in == 1 else None
    kernel = nnx.Param(
        jnp.zeros((num_inputs // quant.pack, *out_shape), jnp.int8),
        out_sharding=(in_axis, *out_axes),
        eager_sharding=False,
    )
    scale = param(None, (groups, *out_shape), (None, *out_axes), value=1.0, dtype=param_dtype)
    return kernel, scale


def num_inputs(equation: str) -> int:
    """How many leading kernel axes an 'x,kernel->y' einsum contracts; ValueError unless
    they lead (the layout quantized kernels flatten)."""
    ins, out = equation.split("->")
    lhs, rhs = ins.split(",")
    contracted = [c in lhs and c not in out for c in rhs]
    n_in = sum(contracted)
    if contracted != [True] * n_in + [False] * (len(rhs) - n_in):
        raise ValueError(f"cannot quantize {equation!r}: its contracted kernel axes must lead.")
    return n_in


class Einsum(nnx.Module):
    """A linear map written as an einsum, e.g. 'BTD,DNH->BTNH', with an optional bias and
    an optional LoRA update (`lora_a` [in..., R] and `lora_b` [R, out...]).

    All dense layers of the models go through this class, so a variant (LoRA, int8
    weight-only) can replace it without touching the models. With `quant` the kernel is
    stored quantized (`llm_jax.ops.quant`): `kernel` int8 [I / pack, O...] with the input
    axes flattened to I, and `scale` [G, O...]; it is dequantized in the compute dtype
    right before the product.
    """

    def __init__(
        self,
        equation: str,
        shape: tuple[int, ...],
        axes: Axes,
        *,
        std: float,
        bias_shape: tuple[int, ...] | None = None,
        bias_axes: Axes | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        lora: LoRA | None = None,
        quant: Quant | None = None,
        rngs: nnx.Rngs,
    ):
        self.equation = equation
        self.dtype = dtype
        self.quant = quant
        self.kernel_shape = shape
        # Set by the XLA:CPU decoders on a copy of the graph: `kernel` holds the float
        # kernel [out..., in...] (`_xla_cpu.to_output_major`).
        self.output_major = False
        key = rngs.params()
        if quant is None:
            self.kernel = param(None, shape, axes, std=std, dtype=param_dtype, key=key)
        else:
            if lora is not None:
                raise ValueError("LoRA on a quantized kernel is not supported.")
            n_in = num_inputs(equation)
            self.kernel, self.scale = _quantized_kernel(shape, n_in, axes, quant, param_dtype)
        self.bias = param(None, bias_shape, bias_axes, dtype=param_dtype) if bias_shape else None
        self.lora = lora
        # A's key folds out of the kernel's, leaving the key stream (and so every other
        # parameter of a model built with the same seed) as it is without LoRA.
        a_key = jax.random.fold_in(key, 1)
        factors = _lora_factors(equation, shape, axes, lora, param_dtype, a_key) if lora else None
        self.lora_a, self.lora_b = factors if factors else (None, None)

    def __call__(self, x: Array, *, dropout_rng: jax.Array | None = None) -> Array:
        """x through the layer; `dropout_rng` turns on the LoRA input dropout (training)."""
        x = x.astype(self.dtype)
        y = None
        if self.quant is not None:  # the int8/int4 kernel on CPU for decode-sized inputs
            q, s = self.kernel[...], self.scale[...]
            y = qmatmul.einsum(self.equation, x, q, s, self.quant.bits)
        if y is None and self.output_major:
            y = _xla_cpu.output_major_einsum(self.equation, x, self.kernel[...].astype(self.dtype))
        if y is None:
            y = _xla_cpu.dense_einsum(self.equation, x, self.float_kernel())
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            x_lora = ops.dropout(x, self.lora.dropout, dropout_rng)
            y = y + ops.lora_update(
                self.equation, x_lora, self.lora_a[...], self.lora_b[...], self.lora.scale
            )
        return y

    def float_kernel(self) -> Array:
        """The kernel [in..., out...] in the compute dtype (dequantized when quantized)."""
        if self.quant is None:
            return self.kernel[...].astype(self.dtype)
        w = quant_ops.dequantize(self.kernel[...], self.scale[...], self.quant.bits, self.dtype)
        return w.reshape(self.kernel_shape)


def lookup_table(table: Float[Array, "V E"], row_axis: str = "vocab") -> Float[Array, "V E"]:
    """An embedding table [V, E] about to be indexed, with its `embed` shards gathered.

    What FSDP does for every weight before use: rows gathered from an embed-sharded table
    come out sharded on E, and XLA cannot move that to the batch-sharded activation layout
    without a full rematerialization (it warns). The rows keep their own logical axis
    `row_axis` ("vocab" may stay split for vocab parallelism; "positions", "types").
    """
    return constrain(table, (row_axis, None))


class Embed(nnx.Module):
    """A token (or position/type) embedding table [V, E] with a tied-output `attend`.

    With `quant` the table is stored as the kernel of `attend`: `embedding` int8
    [E / pack, V] and `scale` [G, V] (groups along E, one scale column per token); a lookup
    dequantizes only the rows it reads.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        std: float,
        axes: Axes = ("vocab", "embed"),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        quant: Quant | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.row_axis = axes[0]
        self.dtype = dtype
        quant = quant.for_embedding() if quant is not None else None
        self.quant = quant
        if quant is None:
            self.embedding = param(
                rngs, (num_embeddings, features), axes, std=std, dtype=param_dtype
            )
        else:
            rngs.params()  # the float table's key, so later parameters draw what they would
            self.embedding, self.scale = _quantized_kernel(
                (features, num_embeddings), 1, axes[::-1], quant, param_dtype
            )

    def __call__(self, ids: Int[Array, "..."]) -> Float[Array, "... E"]:
        if self.quant is not None:
            q = jnp.take(self.embedding[...], ids, axis=1)  # [E / pack, ...]
            s = jnp.take(self.scale[...], ids, axis=1)  # [G, ...]
            rows = quant_ops.dequantize(q, s, self.quant.bits, self.dtype)  # [E, ...]
            return jnp.moveaxis(rows, 0, -1)
        table = lookup_table(self.embedding[...], self.row_axis)
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: Float[Array, "... E"]) -> Float[Array, "... V"]:
        """Logits against the table: x E^T (tied input/output embeddings)."""
        x = x.astype(self.dtype)
        if self.quant is not None:
            batch = "BTSU"[: x.ndim - 1]
            q, s = self.embedding[...], self.scale[...]
            y = qmatmul.einsum(f"{batch}E,EV->{batch}V", x, q, s, self.quant.bits)
            if y is not None:
                return y
            table_t = quant_ops.dequantize(
                self.embedding[...], self.scale[...], self.quant.bits, self.dtype
            )  # [E, V]
            return jnp.einsum("...E,EV->...V", x, table_t)
        return jnp.einsum("...E,VE->...V", x, self.embedding[...].astype(self.dtype))


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last axis, with logical axis `embed`."""

    def __init__(
        self,
        dim: int,
        *,
        kind: str,
        eps: float,
        use_bias: bool,
        axis_name: str = "embed",
        param_dtype: Any = jnp.float32,
    ):
        self.kind = kind
        self.eps = eps
        self.scale = param(None, (dim,), (axis_name,), value=1.0, dtype=param_dtype)
        has_bias = use_bias and kind == "layernorm"
        self.bias = param(None, (dim,), (axis_name,), dtype=param_dtype) if has_bias else None

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.scale[...], eps=self.eps)
        bias = None if self.bias is None else self.bias[...]
        return ops.layer_norm(x, self.scale[...], bias, eps=self.eps)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """The values a Transformer block needs: sizes, choices and dtypes, no model family.

    Attributes:
      d_model, num_heads, num_kv_heads, head_dim, d_ff: D, N, K, H, F.
      norm, norm_eps, norm_position: "layernorm" | "rmsnorm", its epsilon, "pre" | "post".
      use_bias: biases on the dense layers (and LayerNorm).
      activation, gated_mlp: the MLP nonlinearity, and act(x W_gate) * (x W_up) when gated.
      rope_theta, rope_scaling: RoPE on the self-attention queries/keys (None: no RoPE),
        and its `ops.llama3_rope_frequencies` arguments (None: plain RoPE).
      attention_scale: multiply q k^T by 1/sqrt(H) (T5 folds it into the init instead).
      dropout_rate, attention_dropout_rate: residual and attention-probability dropout.
      dtype, param_dtype: the compute and parameter dtypes.
      lora, lora_targets: the LoRA settings (None: no LoRA) and the dense layer names
        (q, k, v, o, wi, wi_gate, wo) that get it.
      attention_impl: auto | xla | cudnn | pallas (`llm_jax.models.attention_impl`).
    """

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    norm: str
    norm_eps: float
    norm_position: str
    use_bias: bool
    activation: str
    gated_mlp: bool
    rope_theta: float | None
    rope_scaling: tuple[tuple[str, float], ...] | None
    attention_scale: bool
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Any
    param_dtype: Any
    lora: LoRA | None = None
    lora_targets: tuple[str, ...] = ()
    attention_impl: str = "auto"
    quant: Quant | None = None

    def lora_of(self, name: str) -> LoRA | None:
        """The LoRA settings of dense layer `name`, or None when it is not a target."""
        return self.lora if name in self.lora_targets else None


def block_spec(cfg: ModelConfig) -> BlockSpec:
    """The block values of a model config (RoPE only with `position='rope'`)."""
    rope = cfg.position == "rope"
    return BlockSpec(
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        d_ff=cfg.d_ff,
        norm=cfg.norm,
        norm_eps=cfg.norm_eps,
        norm_position=cfg.norm_position,
        use_bias=cfg.use_bias,
        activation=cfg.activation,
        gated_mlp=cfg.gated_mlp,
        rope_theta=cfg.rope_theta if rope else None,
        rope_scaling=cfg.rope_scaling if rope else None,
        attention_scale=cfg.attention_scale,
        dropout_rate=cfg.dropout_rate,
        attention_dropout_rate=cfg.attention_dropout_rate,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        lora=LoRA(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) if cfg.lora_rank else None,
        lora_targets=cfg.lora_layers,
        attention_impl=cfg.attention_impl,
        quant=quant_of(cfg),
    )


def make_norm(spec: BlockSpec, dim: int | None = None) -> Norm:
    """The spec's norm over `dim` features (default D)."""
    return Norm(
        spec.d_model if dim is None else dim,
        kind=spec.norm,
        eps=spec.norm_eps,
        use_bias=spec.use_bias,
        param_dtype=spec.param_dtype,
    )


class _Projections(nnx.Module):
    """The q, k, v, o projections of multi-head / grouped-query attention, and the op."""

    def __init__(self, spec: BlockSpec, init: InitScheme, *, rngs: nnx.Rngs):
        d, n, k, h = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = None if spec.attention_scale else 1.0
        self.dropout_rate = spec.attention_dropout_rate
        self.attention_impl = spec.attention_impl
        common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, quant=spec.quant, rngs=rngs)

        def dense(name, equation, shape, axes, std, bias_shape, bias_axes):
            bias = dict(bias_shape=bias_shape, bias_axes=bias_axes) if spec.use_bias else {}
            lora = spec.lora_of(name)
            return Einsum(equation, shape, axes, std=std, **bias, lora=lora, **common)

        self.q = dense(
            "q",
            "BTD,DNH->BTNH",
            (d, n, h),
            ("embed", "heads", "kv"),
            init.q,
            (n, h),
            ("heads", "kv"),
        )

        def kv(name):  # k and v: the same shape and init, separate parameters
            return dense(
                name,
                "BSD,DKH->BSKH",
                (d, k, h),
                ("embed", "kv_heads", "kv"),
                init.kv,
                (k, h),
                ("kv_heads", "kv"),
            )

        self.k, self.v = kv("k"), kv("v")
        self.o = dense(
            "o", "BTNH,NHD->BTD", (n, h, d), ("heads", "kv", "embed"), init.o, (d,), ("embed",)
        )

    def _project_kv(
        self, x: Float[Array, "B S D"], lora_rngs: list[jax.Array | None]
    ) -> tuple[Float[Array, "B S K H"], Float[Array, "B S K H"]]:
        axes = ("batch", "length", "kv_heads", "kv")
        k = self.k(x, dropout_rng=lora_rngs[1])
        return constrain(k, axes), constrain(self.v(x, dropout_rng=lora_rngs[2]), axes)

    def _attend(
        self,
        q: Float[Array, "B T N H"],
        k: Float[Array, "B S K H"],
        v: Float[Array, "B S K H"],
        mask: attn.AttentionMask | Bool[Array, "#B #N T S"] | None,
        bias: Float[Array, "#B N T S"] | None,
        dropout_rng: jax.Array | None,
        lora_rng: jax.Array | None,
    ) -> Float[Array, "B T D"]:
        out = attn.attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask=mask,
            bias=bias,
            impl=self.attention_impl,
            scale=self.scale,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
        )  # [B, T, N, H]
        out = constrain(out, ("batch", "length", "heads", "kv"))
        return self.o(out, dropout_rng=lora_rng)


class SelfAttention(_Projections):
    """Self-attention, with RoPE when the spec has it and an optional `LayerKV` cache."""

    def __init__(self, spec: BlockSpec, init: InitScheme, *, rngs: nnx.Rngs):
        super().__init__(spec, init, rngs=rngs)
        self.rope_theta = spec.rope_theta
        self.rope_scaling = spec.rope_scaling

    def _rope(self, x: Float[Array, "B T N H"], positions: Int[Array, "B T"]) -> Array:
        inv_freq = None
        if self.rope_scaling is not None:
            inv_freq = ops.llama3_rope_frequencies(
                x.shape[-1], self.rope_theta, **dict(self.rope_scaling)
            )
        return ops.apply_rope(x, positions, theta=self.rope_theta, inv_freq=inv_freq)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        *,
        mask: Bool[Array, "#B #N T S"] | None = None,
        bias: Float[Array, "#B N T S"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        cache: LayerKV | None = None,
        index: Int[Array, ""] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[Float[Array, "B T D"], LayerKV | None]:
        """Attention output [B, T, D]; with a cache, the new keys/values are written at
        `index` and the queries attend over all S slots (the cache is returned updated).
        `dropout_rng` drives the attention dropout and the LoRA dropouts."""
        lora_rngs = lora_keys(dropout_rng, 4)  # q, k, v, o
        q = self.q(x, dropout_rng=lora_rngs[0])
        q = constrain(q, ("batch", "length", "heads", "kv"))  # [B, T, N, H]
        k, v = self._project_kv(x, lora_rngs)  # [B, T, K, H]
        if self.rope_theta is not None:
            q, k = self._rope(q, positions), self._rope(k, positions)
        if cache is not None and attend_beside_cache(cache, q, mask, bias):
            k_old, v_old = cache.keys_values()  # [B, S, K, H], before the write
            k, v = k.astype(k_old.dtype).astype(q.dtype), v.astype(v_old.dtype).astype(q.dtype)
            out = attention_beside_cache(q, k, v, k_old, v_old, mask, index, scale=self.scale)
            out = constrain(out, ("batch", "length", "heads", "kv"))
            k, v = _xla_cpu.ordered_after(out, k, v)
            return self.o(out, dropout_rng=lora_rngs[3]), cache.write(k, v, index)
        if cache is not None:
            cache = cache.write(k, v, index)
            k, v = cache.keys_values()  # [B, S, K, H]
        return self._attend(q, k, v, mask, bias, dropout_rng, lora_rngs[3]), cache


class CrossAttention(_Projections):
    """Attention from decoder queries to an encoder output's keys/values (its memory)."""

    def memory(
        self,
        encoder_out: Float[Array, "B S D"],
        *,
        heads_major: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> LayerKV:
        """The keys/values of `encoder_out`, computed once per encoder pass; `dropout_rng`
        (training) is the cross-attention's key, whose LoRA dropouts apply here."""
        k, v = self._project_kv(encoder_out, lora_keys(dropout_rng, 4))
        return LayerKV.of(k, v, heads_major=heads_major)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        memory: LayerKV,
        *,
        mask: Bool[Array, "#B #N T S"] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B T D"]:
        lora_rngs = lora_keys(dropout_rng, 4)  # q, k, v, o (k, v: in `memory`)
        q = self.q(x, dropout_rng=lora_rngs[0])
        q = constrain(q, ("batch", "length", "heads", "kv"))  # [B, T, N, H]
        k, v = memory.keys_values()  # [B, S, K, H]
        return self._attend(q, k, v, mask, None, dropout_rng, lora_rngs[3])


class MLP(nnx.Module):
    """Position-wise feed-forward: wo(act(x wi)), or gated wo(act(x wi_0) * (x wi_1))."""

    def __init__(self, spec: BlockSpec, init: InitScheme, *, rngs: nnx.Rngs):
        d, f = spec.d_model, spec.d_ff
        self.activation = spec.activation
        common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, quant=spec.quant, rngs=rngs)
        use_bias = spec.use_bias
        in_bias = dict(bias_shape=(f,), bias_axes=("mlp",)) if use_bias else {}
        out_bias = dict(bias_shape=(d,), bias_axes=("embed",)) if use_bias else {}

        def wi(name):
            return Einsum(
                "BTD,DF->BTF",
                (d, f),
                ("embed", "mlp"),
                std=init.mlp_in,
                **in_bias,
                lora=spec.lora_of(name),
                **common,
            )

        self.wi = wi("wi")
        self.wi_gate = wi("wi_gate") if spec.gated_mlp else None
        self.wo = Einsum(
            "BTF,FD->BTD",
            (f, d),
            ("mlp", "embed"),
            std=init.mlp_out,
            **out_bias,
            lora=spec.lora_of("wo"),
            **common,
        )

    def __call__(
        self, x: Float[Array, "B T D"], *, dropout_rng: jax.Array | None = None
    ) -> Float[Array, "B T D"]:
        """`dropout_rng` (training) drives the LoRA dropouts; the MLP has no other."""
        rngs = lora_keys(dropout_rng, 3)  # wi, wi_gate, wo
        up = self.wi(x, dropout_rng=rngs[0])
        if self.wi_gate is None:
            h = ops.get_activation(self.activation)(up)
        else:
            h = ops.glu(self.wi_gate(x, dropout_rng=rngs[1]), up, self.activation)  # [B, T, F]
        return self.wo(constrain(h, ("batch", "length", "mlp")), dropout_rng=rngs[2])


class Block(nnx.Module):
    """One Transformer layer: self-attention, optional cross-attention, MLP.

    `norm_position='pre'` computes x + f(norm(x)) (GPT-2, LLaMA, T5); 'post' computes
    norm(x + f(x)) (BERT, the original Transformer).
    """

    def __init__(self, spec: BlockSpec, init: InitScheme, *, cross_attention: bool, rngs: nnx.Rngs):
        self.norm_position = spec.norm_position
        self.dropout_rate = spec.dropout_rate
        self.self_attn = SelfAttention(spec, init, rngs=rngs)
        self.self_attn_norm = make_norm(spec)
        self.cross_attn = CrossAttention(spec, init, rngs=rngs) if cross_attention else None
        self.cross_attn_norm = make_norm(spec) if cross_attention else None
        self.mlp = MLP(spec, init, rngs=rngs)
        self.mlp_norm = make_norm(spec)

    def _residual(self, x, norm, fn, rng):
        if self.norm_position == "pre":
            y, aux = fn(norm(x))
            return x + ops.dropout(y, self.dropout_rate, rng), aux
        y, aux = fn(x)
        return norm(x + ops.dropout(y, self.dropout_rate, rng)), aux

    def __call__(
        self,
        x: Float[Array, "B T D"],
        *,
        mask: Bool[Array, "#B 1 T S"] | None,
        bias: Float[Array, "#B N T S"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        encoder_out: Float[Array, "B Se D"] | None = None,
        memory: LayerKV | None = None,
        cross_mask: Bool[Array, "#B 1 T Se"] | None = None,
        cache: LayerKV | None = None,
        index: Int[Array, ""] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[Float[Array, "B T D"], LayerKV | None]:
        """The layer's output and its updated self-attention cache (None without one).

        Cross-attention reads `memory` (precomputed keys/values) or projects `encoder_out`.
        """
        rngs = split_key(dropout_rng, 5)
        x, cache = self._residual(
            x,
            self.self_attn_norm,
            lambda y: self.self_attn(
                y,
                mask=mask,
                bias=bias,
                positions=positions,
                cache=cache,
                index=index,
                dropout_rng=rngs[0],
            ),
            rngs[1],
        )
        if self.cross_attn is not None:
            if memory is None:
                memory = self.cross_attn.memory(encoder_out, dropout_rng=rngs[2])
            x, _ = self._residual(
                x,
                self.cross_attn_norm,
                lambda y: (self.cross_attn(y, memory, mask=cross_mask, dropout_rng=rngs[2]), None),
                rngs[3],
            )
        # The MLP's LoRA dropouts fold their keys out of the residual dropout's key.
        x, _ = self._residual(
            x, self.mlp_norm, lambda y: (self.mlp(y, dropout_rng=rngs[4]), None), rngs[4]
        )
        return constrain(x, ("batch", "length", "embed")), cache


REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

T = TypeVar("T")


class Stack(nnx.Module):
    """L blocks whose parameters are stacked on a leading `layers` axis.

    The same parameters run either under `lax.scan` (one compiled layer, fast compiles) or
    as an unrolled Python loop over slices; `scan_layers` only changes the program, never
    the parameters or checkpoints. With `share_layers` (ALBERT) one block is applied L times.
    """

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], Block],
        num_layers: int,
        *,
        scan: bool,
        remat_policy: str,
        shared: bool,
        rngs: nnx.Rngs,
    ):
        self.num_layers = num_layers
        self.scan = scan
        self.remat_policy = remat_policy
        self.shared = shared
        if shared:
            self.blocks = make_block(rngs)
        else:
            keys = jax.random.split(rngs.params(), num_layers)

            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(key):
                return make_block(nnx.Rngs(params=key))

            self.blocks = create(keys)

    def map_layers(self, fn: Callable[[Block], T]) -> T:
        """`fn` of every layer's block, stacked on a leading L axis (vmapped, no loop)."""
        graphdef, state = nnx.split(self.blocks)
        if self.shared:
            out = fn(nnx.merge(graphdef, state))
            return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers, *a.shape)), out)
        return jax.vmap(lambda s: fn(nnx.merge(graphdef, s)))(state)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        *,
        cache: LayerKV | None = None,
        memory: LayerKV | None = None,
        dropout_rng: jax.Array | None = None,
        **kwargs: Any,
    ) -> tuple[Float[Array, "B T D"], LayerKV | None]:
        """Apply the L blocks.

        `cache` (self-attention) and `memory` (cross-attention) are stacked [L, ...] and
        each layer gets its slice; kwargs go to every block. Returns the output and the
        updated stacked cache (None without one).
        """
        graphdef, state = nnx.split(self.blocks)
        layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, self.num_layers)

        def layer(x, layer_state, layer_cache, layer_memory, rng):
            block = nnx.merge(graphdef, layer_state)
            return block(x, cache=layer_cache, memory=layer_memory, dropout_rng=rng, **kwargs)

        if self.remat_policy != "none":
            layer = jax.checkpoint(
                layer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan
            )

        if self.scan:

            def body(x, xs):
                layer_cache, layer_memory, rng, stacked_state = xs
                layer_state = state if self.shared else stacked_state
                return layer(x, layer_state, layer_cache, layer_memory, rng)

            xs = (cache, memory, layer_rngs, None if self.shared else state)
            return jax.lax.scan(body, x, xs, length=self.num_layers)

        def at(tree, i):
            return None if tree is None else jax.tree.map(lambda a: a[i], tree)

        new_caches = []
        for i in range(self.num_layers):
            layer_state = state if self.shared else at(state, i)
            x, c = layer(x, layer_state, at(cache, i), at(memory, i), at(layer_rngs, i))
            new_caches.append(c)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new_caches)


# Model assembly ----------------------------------------------------------------------------


def block_stack(
    cfg: ModelConfig,
    spec: BlockSpec,
    init: InitScheme,
    num_layers: int,
    *,
    cross_attention: bool = False,
    shared: bool = False,
    rngs: nnx.Rngs,
) -> Stack:
    """`num_layers` blocks, scanned and rematerialised as `cfg` says."""
    return Stack(
        lambda r_: Block(spec, init, cross_attention=cross_attention, rngs=r_),
        num_layers,
        scan=cfg.scan_layers,
        remat_policy=cfg.remat_policy,
        shared=shared,
        rngs=rngs,
    )


def untied_lm_head(cfg: ModelConfig, spec: BlockSpec, std: float, rngs: nnx.Rngs) -> Einsum | None:
    """The output projection [D, V], or None when it is the input embedding transposed."""
    if cfg.tie_embeddings:
        return None
    return Einsum(
        "BTD,DV->BTV",
        (cfg.d_model, cfg.vocab_size),
        ("embed", "vocab"),
        std=std,
        dtype=spec.dtype,
        param_dtype=spec.param_dtype,
        quant=spec.quant,
        rngs=rngs,
    )
