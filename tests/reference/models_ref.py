"""Float64 NumPy reference forward passes of whole models, written from the papers.

One function per published architecture, each reading like the paper's description of its
forward pass (GPT-2, LLaMA, BERT / ALBERT, T5 v1.0 / v1.1, the original Transformer). The
per-op math comes from the naive twins in `ops_ref`; nothing here is translated from the
JAX models. The architectural choices (pre- or post-norm, activation, scaling, which head)
are fixed by each function, not read from a config: a wrong preset shows up as a mismatch.

Every function runs ONE unpadded, unpacked document (no batch axis): padded and packed
batches are checked by running each document separately.

Parameters are a nested dict of float64 arrays in the storage layout of `llm_jax.models`
(read from the model with `nnx.to_pure_dict(nnx.state(model, nnx.Param))`):

* dense kernels map input features to output features: attention q/k/v `[D, N, H]` (or
  `[D, K, H]`), attention output `[N, H, D]`, MLP `wi`/`wi_gate` `[D, F]`, `wo` `[F, D]`,
  heads `[D, V]`; biases have the output shape;
* per-layer parameters are stacked on a leading L axis (`layers/blocks/...`), except for
  ALBERT's shared block, which has none;
* norms hold `scale` (and `bias` for LayerNorm).

Shape letters: T target (query) length, S source (key) length, D model dim, E ALBERT
embedding dim, N heads, K key/value heads, H head dim, F MLP hidden, V vocab, U buckets.
"""

from __future__ import annotations

import math

import numpy as np

from tests.reference.ops_ref import (
    apply_rope_ref,
    attention_ref,
    causal_mask_ref,
    gelu_ref,
    gelu_tanh_ref,
    layer_norm_ref,
    llama3_rope_frequencies_ref,
    relu_ref,
    rms_norm_ref,
    silu_ref,
    sinusoidal_positions_ref,
    t5_relative_position_bias_ref,
)

# ---------------------------------------------------------------------------- building blocks


def layer_params(stack, i, shared=False):
    """Parameters of layer i: slice i of every [L, ...] leaf, or the shared block (ALBERT)."""
    if shared:
        return stack
    return {k: layer_params(v, i) if isinstance(v, dict) else v[i] for k, v in stack.items()}


def num_stacked_layers(stack):
    """L, the leading axis of a stacked block's parameters."""
    leaf = stack
    while isinstance(leaf, dict):
        leaf = next(iter(leaf.values()))
    return leaf.shape[0]


def linear(x, p):
    """x W + b for a dense layer {kernel [in, out...], bias [out...] (absent: no bias)}.

    The kernel's trailing axes (e.g. heads x head dim) are flattened into one output axis
    for an ordinary matrix product and split again afterwards.
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(p["kernel"], np.float64)
    y = x @ w.reshape(w.shape[0], -1)
    if p.get("bias") is not None:
        y = y + np.asarray(p["bias"], np.float64).reshape(-1)
    return y.reshape(*x.shape[:-1], *w.shape[1:])


def layer_norm(x, p, eps):
    """LayerNorm with gain and (when stored) bias."""
    return layer_norm_ref(x, p["scale"], p.get("bias"), eps=eps)


def rms_norm(x, p, eps):
    """RMSNorm (T5's "LayerNorm" and LLaMA's): gain only, no centring, no bias."""
    return rms_norm_ref(x, p["scale"], eps=eps)


def multi_head_attention(
    p, x_q, x_kv, *, causal, scale=None, bias=None, rope_theta=None, rope_inv_freq=None
):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_N) W^O (Vaswani et al. 2017, §3.2.2).

    head_n = softmax(Q_n K_g^T * scale + bias [+ causal mask]) V_g, with key/value head
    g = n // (N / K) when there are fewer key/value heads (GQA / MQA).

    Args:
      p: {q, k, v, o} dense layers.
      x_q: [T, D] queries' inputs; x_kv: [S, D] keys'/values' inputs (x_q for self-attention).
      causal: position t may attend to positions <= t only (decoder self-attention).
      scale: multiplier of q.k; 1 / sqrt(H) when None.
      bias: [N, T, S] additive logit bias (T5 relative positions) or None.
      rope_theta: rotate queries and keys by RoPE at positions 0.. when given (LLaMA).
      rope_inv_freq: [H/2] rescaled RoPE frequencies (LLaMA 3) instead of theta's own.

    Returns:
      [T, D] float64.
    """
    t_, s_ = x_q.shape[0], x_kv.shape[0]
    q = linear(x_q, p["q"])  # [T, N, H]
    k = linear(x_kv, p["k"])  # [S, K, H]
    v = linear(x_kv, p["v"])  # [S, K, H]
    if rope_theta is not None:
        rope = dict(theta=rope_theta, inv_freq=rope_inv_freq)
        q = apply_rope_ref(q[None], np.arange(t_)[None], **rope)[0]
        k = apply_rope_ref(k[None], np.arange(s_)[None], **rope)[0]
    mask = causal_mask_ref(t_, s_) if causal else None
    heads = attention_ref(
        q[None],
        k[None],
        v[None],
        mask=mask,
        bias=None if bias is None else bias[None],
        scale=scale,
    )[0]  # [T, N, H]
    concat = heads.reshape(t_, -1)  # [T, N * H]
    w_o = np.asarray(p["o"]["kernel"], np.float64)  # [N, H, D]
    out = concat @ w_o.reshape(concat.shape[1], -1)  # [T, D]
    if p["o"].get("bias") is not None:
        out = out + np.asarray(p["o"]["bias"], np.float64)
    return out


def feed_forward(p, x, act):
    """FFN(x) = act(x W_1 + b_1) W_2 + b_2 (Vaswani et al. 2017, §3.3)."""
    return linear(act(linear(x, p["wi"])), p["wo"])


def gated_feed_forward(p, x, act):
    """GLU-variant FFN (Shazeer 2020): (act(x W_gate) * (x W_up)) W_down."""
    return linear(act(linear(x, p["wi_gate"])) * linear(x, p["wi"]), p["wo"])


# ---------------------------------------------------------------------------- decoder-only


def gpt2_ref(params, tokens):
    """GPT-2 (Radford et al. 2019) next-token logits [T, V] of one document.

    h_0 = W_e[tokens] + W_p[0..T-1]; each block (pre-LN, LayerNorm eps 1e-5):
      h = h + Attn_causal(LN(h));  h = h + FFN_gelu_tanh(LN(h));
    then a final LN and the tied head h W_e^T.
    """
    tokens = np.asarray(tokens)
    eps = 1e-5
    w_e = np.asarray(params["embed"]["embedding"], np.float64)
    w_p = np.asarray(params["pos_embed"], np.float64)
    h = w_e[tokens] + w_p[np.arange(len(tokens))]
    stack = params["layers"]["blocks"]
    for i in range(num_stacked_layers(stack)):
        p = layer_params(stack, i)
        a = layer_norm(h, p["self_attn_norm"], eps)
        h = h + multi_head_attention(p["self_attn"], a, a, causal=True)
        h = h + feed_forward(p["mlp"], layer_norm(h, p["mlp_norm"], eps), gelu_tanh_ref)
    h = layer_norm(h, params["final_norm"], eps)
    return h @ w_e.T


def llama_ref(params, tokens, *, eps, rope_theta, rope_scaling=None):
    """LLaMA (Touvron et al. 2023) next-token logits [T, V] of one document.

    h_0 = W_e[tokens] (no absolute positions); each block (pre-RMSNorm):
      h = h + Attn_causal_rope_gqa(RMS(h));  h = h + SwiGLU(RMS(h));
    then a final RMSNorm and an untied output projection. `rope_scaling`: keyword
    arguments of `llama3_rope_frequencies_ref` (LLaMA 3.1/3.2), or None.
    """
    tokens = np.asarray(tokens)
    h = np.asarray(params["embed"]["embedding"], np.float64)[tokens]
    stack = params["layers"]["blocks"]
    inv_freq = None
    for i in range(num_stacked_layers(stack)):
        p = layer_params(stack, i)
        if rope_scaling is not None and inv_freq is None:
            head_dim = np.asarray(p["self_attn"]["q"]["kernel"]).shape[-1]
            inv_freq = llama3_rope_frequencies_ref(head_dim, rope_theta, **rope_scaling)
        a = rms_norm(h, p["self_attn_norm"], eps)
        h = h + multi_head_attention(
            p["self_attn"], a, a, causal=True, rope_theta=rope_theta, rope_inv_freq=inv_freq
        )
        h = h + gated_feed_forward(p["mlp"], rms_norm(h, p["mlp_norm"], eps), silu_ref)
    h = rms_norm(h, params["final_norm"], eps)
    return linear(h, params["lm_head"])


# ---------------------------------------------------------------------------- encoder-only


def bert_ref(params, tokens, token_type_ids, *, num_layers, albert=False):
    """BERT (Devlin et al. 2019) or ALBERT (Lan et al. 2020) on one document.

    Embeddings: LN(W_word[tokens] + W_pos[0..T-1] + W_type[token_type_ids]) (eps 1e-12);
    ALBERT's are E-wide and then projected E -> D. Each block is post-LN:
      h = LN(h + Attn(h));  h = LN(h + FFN_gelu(h))   (exact erf GELU);
    ALBERT applies one shared block `num_layers` times.
    Heads: MLM  LN(gelu(h W_t + b_t)) W_word^T + b  (tied decoder, output bias);
    pooler  tanh(h[0] W_p + b_p);  NSP  pooled W_nsp + b;  classifier  pooled W_c + b.

    Returns:
      dict with `hidden` [T, D], `mlm_logits` [T, V], `pooled` [D], `nsp_logits` [2] and,
      when the model has a classifier, `class_logits` [C].
    """
    tokens = np.asarray(tokens)
    token_type_ids = np.asarray(token_type_ids)
    eps = 1e-12
    w_word = np.asarray(params["embed"]["embedding"], np.float64)
    w_pos = np.asarray(params["pos_embed"], np.float64)
    w_type = np.asarray(params["type_embed"], np.float64)
    h = w_word[tokens] + w_pos[np.arange(len(tokens))] + w_type[token_type_ids]
    h = layer_norm(h, params["embed_norm"], eps)
    if albert:
        h = linear(h, params["embed_proj"])  # factorized embeddings: E -> D
    stack = params["layers"]["blocks"]
    for i in range(num_layers):
        p = layer_params(stack, i, shared=albert)
        h = layer_norm(
            h + multi_head_attention(p["self_attn"], h, h, causal=False), p["self_attn_norm"], eps
        )
        h = layer_norm(h + feed_forward(p["mlp"], h, gelu_ref), p["mlp_norm"], eps)
    out = {"hidden": h}
    transformed = layer_norm(gelu_ref(linear(h, params["mlm_transform"])), params["mlm_norm"], eps)
    out["mlm_logits"] = transformed @ w_word.T + np.asarray(params["mlm_bias"], np.float64)
    pooled = np.tanh(linear(h[0], params["pooler"]))
    out["pooled"] = pooled
    out["nsp_logits"] = linear(pooled, params["nsp_head"])
    if "classifier" in params:
        out["class_logits"] = linear(pooled, params["classifier"])
    return out


# ---------------------------------------------------------------------------- encoder–decoder


def t5_ref(params, encoder_tokens, decoder_tokens, *, version, max_distance):
    """T5 (Raffel et al. 2020) decoder logits [T, V] for one (source, target-input) pair.

    Shared token embedding, no absolute positions: each stack has ONE relative-position
    bias table [U, N] shared by its layers' self-attention (bidirectional buckets in the
    encoder, causal buckets in the decoder; none in cross-attention). Pre-RMSNorm blocks
    (eps 1e-6), attention logits NOT scaled by 1/sqrt(H), final RMSNorm per stack.
      v1.0: ReLU FFN; tied head on h * D^-0.5.
      v1.1: gated-GELU (tanh) FFN; untied head, unscaled.
    """
    if version not in ("1.0", "1.1"):
        raise ValueError(f"version must be '1.0' or '1.1'; got {version!r}.")
    eps = 1e-6
    w_e = np.asarray(params["embed"]["embedding"], np.float64)

    def ffn(p, x):
        if version == "1.0":
            return feed_forward(p, x, relu_ref)
        return gated_feed_forward(p, x, gelu_tanh_ref)

    def rel_bias(table, q_len, k_len, bidirectional):
        return t5_relative_position_bias_ref(
            table,
            np.arange(q_len)[None],
            np.arange(k_len)[None],
            bidirectional,
            max_distance=max_distance,
        )[0]  # [N, T, S]

    x = w_e[np.asarray(encoder_tokens)]
    s_ = x.shape[0]
    enc_bias = rel_bias(params["encoder_rel_bias"], s_, s_, True)
    stack = params["encoder"]["blocks"]
    for i in range(num_stacked_layers(stack)):
        p = layer_params(stack, i)
        a = rms_norm(x, p["self_attn_norm"], eps)
        x = x + multi_head_attention(p["self_attn"], a, a, causal=False, scale=1.0, bias=enc_bias)
        x = x + ffn(p["mlp"], rms_norm(x, p["mlp_norm"], eps))
    enc = rms_norm(x, params["encoder_norm"], eps)

    y = w_e[np.asarray(decoder_tokens)]
    t_ = y.shape[0]
    dec_bias = rel_bias(params["decoder_rel_bias"], t_, t_, False)
    stack = params["decoder"]["blocks"]
    for i in range(num_stacked_layers(stack)):
        p = layer_params(stack, i)
        a = rms_norm(y, p["self_attn_norm"], eps)
        y = y + multi_head_attention(p["self_attn"], a, a, causal=True, scale=1.0, bias=dec_bias)
        a = rms_norm(y, p["cross_attn_norm"], eps)
        y = y + multi_head_attention(p["cross_attn"], a, enc, causal=False, scale=1.0)
        y = y + ffn(p["mlp"], rms_norm(y, p["mlp_norm"], eps))
    y = rms_norm(y, params["decoder_norm"], eps)
    if version == "1.0":
        return (y * y.shape[-1] ** -0.5) @ w_e.T
    return linear(y, params["lm_head"])


def transformer_ref(params, encoder_tokens, decoder_tokens, *, eps):
    """The original Transformer (Vaswani et al. 2017) decoder logits [T, V] for one pair.

    Shared source/target embedding E; inputs E[tokens] * sqrt(D) + PE with the sinusoidal
    table PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(...) (§3.4, §3.5).
    Post-LN sublayers LayerNorm(x + Sublayer(x)) with biases everywhere (§3.1):
      encoder: self-attention, ReLU FFN;
      decoder: causal self-attention, attention over the encoder output, ReLU FFN.
    No final norm; the pre-softmax projection shares E (logits = h E^T, §3.4).
    """
    w_e = np.asarray(params["embed"]["embedding"], np.float64)
    d = w_e.shape[1]

    def embed(tokens):
        tokens = np.asarray(tokens)
        pe = sinusoidal_positions_ref(len(tokens), d)
        return w_e[tokens] * math.sqrt(d) + pe

    x = embed(encoder_tokens)
    stack = params["encoder"]["blocks"]
    for i in range(num_stacked_layers(stack)):
        p = layer_params(stack, i)
        x = layer_norm(
            x + multi_head_attention(p["self_attn"], x, x, causal=False), p["self_attn_norm"], eps
        )
        x = layer_norm(x + feed_forward(p["mlp"], x, relu_ref), p["mlp_norm"], eps)
    enc = x

    y = embed(decoder_tokens)
    stack = params["decoder"]["blocks"]
    for i in range(num_stacked_layers(stack)):
        p = layer_params(stack, i)
        y = layer_norm(
            y + multi_head_attention(p["self_attn"], y, y, causal=True), p["self_attn_norm"], eps
        )
        y = layer_norm(
            y + multi_head_attention(p["cross_attn"], y, enc, causal=False),
            p["cross_attn_norm"],
            eps,
        )
        y = layer_norm(y + feed_forward(p["mlp"], y, relu_ref), p["mlp_norm"], eps)
    return y @ w_e.T
