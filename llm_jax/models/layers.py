"""Flax NNX layers shared by GPT, BERT and T5. They own parameters and call `llm_jax.ops`.

Every parameter carries logical axis names (its `out_sharding` metadata), from this set:
`vocab, embed, heads, kv_heads, kv, mlp, layers, positions, types, buckets, classes`.
A rules table (see `llm_jax.parallel`) maps them onto mesh axes; nothing here is sharded
eagerly, so modules build the same with or without a mesh.

Shape letters: B batch, T query length, S key length, D model dim, N query heads,
K key/value heads, H head dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from llm_jax import ops
from llm_jax.models.config import ModelConfig
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
) -> nnx.Param:
    """A parameter with logical axis names: N(0, std^2) when `std` is given, else constant."""
    if len(shape) != len(axes):
        raise ValueError(f"parameter shape {shape} and axes {axes} differ in rank.")
    if std is None:
        init = jnp.full(shape, value, dtype)
    else:
        init = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(init, out_sharding=axes, eager_sharding=False)


def kernel_einsum(equation: str, x: Array, kernel: Array) -> Array:
    """`jnp.einsum(equation, x, kernel)` for an 'in,kernel->out' equation without batch axes,
    contracting several axes in the kernel's order.

    `jnp.einsum` contracts in alphabetical order of the letters, so 'BTNH,NHD->BTD' becomes
    a dot over (H, N), and XLA:CPU then transposes the whole [N, H, D] kernel (and x) on
    every call; in the kernel's own order both are contracted in place.
    """
    ins, out = equation.split("->")
    lhs, rhs = ins.split(",")
    contract = [c for c in rhs if c in lhs and c not in out]
    if len(contract) < 2 or any(c in lhs and c in out for c in rhs):
        return jnp.einsum(equation, x, kernel)
    dims = ([lhs.index(c) for c in contract], [rhs.index(c) for c in contract])
    y = jax.lax.dot_general(x, kernel, (dims, ((), ())))
    got = [c for c in lhs if c not in contract] + [c for c in rhs if c not in contract]
    return y if got == list(out) else jnp.transpose(y, [got.index(c) for c in out])


class Einsum(nnx.Module):
    """A linear map written as an einsum, e.g. 'BTD,DNH->BTNH', with an optional bias.

    All dense layers of the models go through this class, so a variant (LoRA, int8
    weight-only) can replace it without touching the models.
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
        rngs: nnx.Rngs,
    ):
        self.equation = equation
        self.dtype = dtype
        self.kernel = param(rngs, shape, axes, std=std, dtype=param_dtype)
        self.bias = param(None, bias_shape, bias_axes, dtype=param_dtype) if bias_shape else None

    def __call__(self, x: Array) -> Array:
        y = kernel_einsum(self.equation, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def lookup_table(table: Float[Array, "V E"], row_axis: str = "vocab") -> Float[Array, "V E"]:
    """An embedding table [V, E] about to be indexed, with its `embed` shards gathered.

    What FSDP does for every weight before use: rows gathered from an embed-sharded table
    come out sharded on E, and XLA cannot move that to the batch-sharded activation layout
    without a full rematerialization (it warns). The rows keep their own logical axis
    `row_axis` ("vocab" may stay split for vocab parallelism; "positions", "types").
    """
    return constrain(table, (row_axis, None))


class Embed(nnx.Module):
    """A token (or position/type) embedding table [V, E] with a tied-output `attend`."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        std: float,
        axes: Axes = ("vocab", "embed"),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.row_axis = axes[0]
        self.dtype = dtype
        self.embedding = param(rngs, (num_embeddings, features), axes, std=std, dtype=param_dtype)

    def __call__(self, ids: Int[Array, "..."]) -> Float[Array, "... E"]:
        table = lookup_table(self.embedding[...], self.row_axis)
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: Float[Array, "... E"]) -> Float[Array, "... V"]:
        """Logits against the table: x E^T (tied input/output embeddings)."""
        return jnp.einsum(
            "...E,VE->...V", x.astype(self.dtype), self.embedding[...].astype(self.dtype)
        )


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


def length_to_heads_major(x: Float[Array, "B S K H"]) -> Float[Array, "B K S H"]:
    """Keys/values in the cache's head-major layout.

    The cache is kept [B, K, S, H] because that is the layout the attention products read:
    with batch and head axes leading, q k^T and p v run on the cache in place. Kept
    [B, S, K, H], XLA:CPU copied every layer's whole cache into this layout at every decode
    step (a quarter of a gpt2-small batch-8 step).
    """
    return jnp.swapaxes(x, 1, 2)


def heads_to_length_major(x: Float[Array, "B K S H"]) -> Float[Array, "B S K H"]:
    """The attention op's [B, S, K, H] view of a head-major cache (a transpose XLA folds
    into the attention products)."""
    return jnp.swapaxes(x, 1, 2)


class Attention(nnx.Module):
    """Multi-head / grouped-query attention: projections around `ops.dot_product_attention`.

    Self-attention when `kv_input` is None, cross-attention otherwise. With a cache (a dict
    with `k`, `v` [B, K, S, H], head-major) the new keys/values are written at `cache_index` and the
    queries attend over the whole cache; a cross-attention cache holds the encoder's keys
    and values, computed once.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        use_bias: bool,
        scale: float | None,
        rope_theta: float | None,
        rope_scaling: tuple[tuple[str, float], ...] | None = None,
        dropout_rate: float,
        q_std: float,
        kv_std: float,
        o_std: float,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        d, n, k, h = d_model, num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.dropout_rate = dropout_rate
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def bias(shape, axes):
            return dict(bias_shape=shape, bias_axes=axes) if use_bias else {}

        self.q = Einsum(
            "BTD,DNH->BTNH",
            (d, n, h),
            ("embed", "heads", "kv"),
            std=q_std,
            **bias((n, h), ("heads", "kv")),
            **common,
        )
        self.k = Einsum(
            "BSD,DKH->BSKH",
            (d, k, h),
            ("embed", "kv_heads", "kv"),
            std=kv_std,
            **bias((k, h), ("kv_heads", "kv")),
            **common,
        )
        self.v = Einsum(
            "BSD,DKH->BSKH",
            (d, k, h),
            ("embed", "kv_heads", "kv"),
            std=kv_std,
            **bias((k, h), ("kv_heads", "kv")),
            **common,
        )
        self.o = Einsum(
            "BTNH,NHD->BTD",
            (n, h, d),
            ("heads", "kv", "embed"),
            std=o_std,
            **bias((d,), ("embed",)),
            **common,
        )

    def project_kv(
        self, kv_input: Float[Array, "B S D"], positions: Int[Array, "B S"] | None = None
    ) -> tuple[Float[Array, "B S K H"], Float[Array, "B S K H"]]:
        """Keys and values of `kv_input` (rotated by RoPE when the layer uses it)."""
        axes = ("batch", "length", "kv_heads", "kv")
        k, v = constrain(self.k(kv_input), axes), constrain(self.v(kv_input), axes)
        if self.rope_theta is not None:
            k = self._rope(k, positions)
        return k, v

    def _rope(self, x: Float[Array, "B T M H"], positions: Int[Array, "B T"]) -> Array:
        inv_freq = None
        if self.rope_scaling is not None:
            inv_freq = ops.llama3_rope_frequencies(
                x.shape[-1], self.rope_theta, **dict(self.rope_scaling)
            )
        return ops.apply_rope(x, positions, theta=self.rope_theta, inv_freq=inv_freq)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        kv_input: Float[Array, "B S D"] | None = None,
        *,
        mask: Bool[Array, "#B #N T S"] | None = None,
        bias: Float[Array, "#B N T S"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        cache: dict[str, Array] | None = None,
        cache_index: Int[Array, ""] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[Float[Array, "B T D"], dict[str, Array] | None]:
        q = constrain(self.q(x), ("batch", "length", "heads", "kv"))  # [B, T, N, H]
        if self.rope_theta is not None:
            q = self._rope(q, positions)
        if cache is not None and kv_input is None and cache_index is None:
            # Precomputed cross-attention keys/values, head-major [B, K, S, H].
            k, v = heads_to_length_major(cache["k"]), heads_to_length_major(cache["v"])
        else:
            src = x if kv_input is None else kv_input
            k, v = self.project_kv(src, positions if kv_input is None else None)
            if cache is not None:
                # Decode: write the new keys/values at `cache_index`, attend over all slots.
                start = (0, 0, cache_index, 0)
                new_k = length_to_heads_major(k).astype(cache["k"].dtype)
                new_v = length_to_heads_major(v).astype(cache["v"].dtype)
                cache = {
                    "k": jax.lax.dynamic_update_slice(cache["k"], new_k, start),
                    "v": jax.lax.dynamic_update_slice(cache["v"], new_v, start),
                }
                k, v = heads_to_length_major(cache["k"]), heads_to_length_major(cache["v"])
        out = ops.dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask=mask,
            bias=bias,
            scale=self.scale,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
        )  # [B, T, N, H]
        out = constrain(out, ("batch", "length", "heads", "kv"))
        return self.o(out), cache


class MLP(nnx.Module):
    """Position-wise feed-forward: wo(act(x wi)), or gated wo(act(x wi_0) * (x wi_1))."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str,
        gated: bool,
        use_bias: bool,
        in_std: float,
        out_std: float,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_bias = dict(bias_shape=(d_ff,), bias_axes=("mlp",)) if use_bias else {}
        out_bias = dict(bias_shape=(d_model,), bias_axes=("embed",)) if use_bias else {}
        self.wi = Einsum(
            "BTD,DF->BTF", (d_model, d_ff), ("embed", "mlp"), std=in_std, **in_bias, **common
        )
        self.wi_gate = (
            Einsum(
                "BTD,DF->BTF", (d_model, d_ff), ("embed", "mlp"), std=in_std, **in_bias, **common
            )
            if gated
            else None
        )
        self.wo = Einsum(
            "BTF,FD->BTD", (d_ff, d_model), ("mlp", "embed"), std=out_std, **out_bias, **common
        )

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        if self.wi_gate is None:
            h = ops.get_activation(self.activation)(self.wi(x))
        else:
            h = ops.glu(self.wi_gate(x), self.wi(x), self.activation)  # [B, T, F]
        return self.wo(constrain(h, ("batch", "length", "mlp")))


class Block(nnx.Module):
    """One Transformer layer: self-attention, optional cross-attention, MLP.

    `norm_position='pre'` computes x + f(norm(x)) (GPT-2, LLaMA, T5); 'post' computes
    norm(x + f(x)) (BERT, the original Transformer).
    """

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool, rngs: nnx.Rngs):
        self.norm_position = cfg.norm_position
        self.dropout_rate = cfg.dropout_rate
        d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.d_ff
        r = cfg.initializer_range
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if cfg.family == "t5" and cfg.position == "relative":
            # Mesh-TF/T5 initialisation: fan-in scaled, with 1/sqrt(H) folded into q.
            q_std, kv_std, o_std = r * (d * h) ** -0.5, r * d**-0.5, r * (n * h) ** -0.5
            in_std, out_std = r * d**-0.5, r * f**-0.5
        else:
            # GPT-2: residual projections scaled by 1/sqrt(2L) (Radford et al. 2019).
            out = r / (2 * cfg.num_layers) ** 0.5 if cfg.family == "gpt" else r
            q_std = kv_std = in_std = r
            o_std = out_std = out

        def norm():
            return Norm(
                d, kind=cfg.norm, eps=cfg.norm_eps, use_bias=cfg.use_bias, param_dtype=pdtype
            )

        def attention(rope: bool):
            return Attention(
                d,
                n,
                k,
                h,
                use_bias=cfg.use_bias,
                scale=None if cfg.attention_scale else 1.0,
                rope_theta=cfg.rope_theta if rope else None,
                rope_scaling=cfg.rope_scaling if rope else None,
                dropout_rate=cfg.attention_dropout_rate,
                q_std=q_std,
                kv_std=kv_std,
                o_std=o_std,
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )

        self.self_attn = attention(cfg.position == "rope")
        self.self_attn_norm = norm()
        self.cross_attn = attention(False) if cross_attention else None
        self.cross_attn_norm = norm() if cross_attention else None
        self.mlp = MLP(
            d,
            f,
            activation=cfg.activation,
            gated=cfg.gated_mlp,
            use_bias=cfg.use_bias,
            in_std=in_std,
            out_std=out_std,
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
        )
        self.mlp_norm = norm()

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
        encoder_out: Float[Array, "B S D"] | None = None,
        cross_mask: Bool[Array, "#B 1 T S"] | None = None,
        cache: dict[str, Array] | None = None,
        cache_index: Int[Array, ""] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[Float[Array, "B T D"], dict[str, Array] | None]:
        rngs = [None] * 5 if dropout_rng is None else list(jax.random.split(dropout_rng, 5))
        self_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        x, self_cache = self._residual(
            x,
            self.self_attn_norm,
            lambda y: self.self_attn(
                y,
                mask=mask,
                bias=bias,
                positions=positions,
                cache=self_cache,
                cache_index=cache_index,
                dropout_rng=rngs[0],
            ),
            rngs[1],
        )
        new_cache = None if cache is None else dict(self_cache)
        if self.cross_attn is not None:
            cross_cache = None
            if cache is not None and "cross_k" in cache:
                cross_cache = {"k": cache["cross_k"], "v": cache["cross_v"]}
            x, _ = self._residual(
                x,
                self.cross_attn_norm,
                lambda y: self.cross_attn(
                    y,
                    None if cross_cache is not None else encoder_out,
                    mask=cross_mask,
                    cache=cross_cache,
                    dropout_rng=rngs[2],
                ),
                rngs[3],
            )
            if cache is not None and "cross_k" in cache:
                new_cache.update(cross_k=cache["cross_k"], cross_v=cache["cross_v"])
        x, _ = self._residual(x, self.mlp_norm, lambda y: (self.mlp(y), None), rngs[4])
        return constrain(x, ("batch", "length", "embed")), new_cache


REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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

    def __call__(
        self,
        x: Float[Array, "B T D"],
        *,
        cache: dict[str, Array] | None = None,
        dropout_rng: jax.Array | None = None,
        **kwargs: Any,
    ) -> tuple[Float[Array, "B T D"], dict[str, Array] | None]:
        """Apply the L blocks. `cache` leaves are stacked [L, ...]; kwargs go to each block."""
        graphdef, state = nnx.split(self.blocks)
        layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, self.num_layers)

        def layer(x, layer_state, layer_cache, rng):
            block = nnx.merge(graphdef, layer_state)
            return block(x, cache=layer_cache, dropout_rng=rng, **kwargs)

        if self.remat_policy != "none":
            layer = jax.checkpoint(
                layer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan
            )

        def layer_state(i):
            return state if self.shared else jax.tree.map(lambda a: a[i], state)

        if self.scan:

            def body(x, xs):
                layer_cache, rng, stacked_state = xs
                return layer(x, state if self.shared else stacked_state, layer_cache, rng)

            xs = (cache, layer_rngs, None if self.shared else state)
            return jax.lax.scan(body, x, xs, length=self.num_layers)
        new_caches = []
        for i in range(self.num_layers):
            layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
            rng = None if layer_rngs is None else layer_rngs[i]
            x, c = layer(x, layer_state(i), layer_cache, rng)
            new_caches.append(c)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new_caches)
