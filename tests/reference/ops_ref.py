"""Float64 NumPy twins of `llm_jax.ops`, written from the published formulas.

Each twin is deliberately naive (explicit loops, Python `math` per element) so that it is
obviously correct by reading, not fast. Inputs are converted to float64; outputs are
float64 (or bool / int for masks and buckets). They are independent of the JAX code: do
not "simplify" them into a translation of it.

Shape letters: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim, P positions, D model dim, V vocabulary, U buckets, "..." any leading dims.
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------------------- attention


def attention_ref(q, k, v, mask=None, bias=None, scale=None):
    """softmax(q k^T * scale + bias, masked) v, one (batch, head, query) at a time.

    Vaswani et al. 2017, eq. 1, with grouped key/value heads: query head n reads key/value
    head n // (N // K). Masked keys get probability exactly 0; a query with no visible key
    gets an all-zero output row.

    Args:
      q: [B, T, N, H].
      k, v: [B, S, K, H]; K divides N.
      mask: bool, broadcastable to [B, N, T, S]; True = may attend.
      bias: additive logits bias broadcastable to [B, N, T, S].
      scale: multiplier of q.k; 1 / sqrt(H) when None.

    Returns:
      [B, T, N, H] float64.
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    b_, t_, n_, h_ = q.shape
    s_, k_ = k.shape[1], k.shape[2]
    assert n_ % k_ == 0, (n_, k_)
    group = n_ // k_
    scale = 1.0 / math.sqrt(h_) if scale is None else float(scale)
    full = (b_, n_, t_, s_)
    mask = np.ones(full, bool) if mask is None else np.broadcast_to(np.asarray(mask), full)
    bias = np.zeros(full) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), full)
    out = np.zeros((b_, t_, n_, h_))
    for b in range(b_):
        for kv_head in range(k_):
            for g in range(group):
                n = kv_head * group + g
                for t in range(t_):
                    visible = [s for s in range(s_) if mask[b, n, t, s]]
                    if not visible:
                        continue  # fully masked query: zero output
                    logits = {
                        s: scale * sum(q[b, t, n, h] * k[b, s, kv_head, h] for h in range(h_))
                        + bias[b, n, t, s]
                        for s in visible
                    }
                    m = max(logits.values())
                    weights = {s: math.exp(logit - m) for s, logit in logits.items()}
                    z = sum(weights.values())
                    for s, w in weights.items():
                        out[b, t, n] += (w / z) * v[b, s, kv_head]
    return out


def causal_mask_ref(q_len, kv_len=None, q_offset=0):
    """[1, 1, T, S] bool: query i (at absolute position i + q_offset) sees key j <= it."""
    kv_len = q_len if kv_len is None else kv_len
    m = np.zeros((1, 1, q_len, kv_len), bool)
    for i in range(q_len):
        for j in range(kv_len):
            m[0, 0, i, j] = j <= i + q_offset
    return m


def padding_mask_ref(q_valid, kv_valid=None):
    """[B, 1, T, S] bool: both the query and the key are real tokens."""
    q_valid = np.asarray(q_valid, bool)
    kv_valid = q_valid if kv_valid is None else np.asarray(kv_valid, bool)
    b_, t_ = q_valid.shape
    s_ = kv_valid.shape[1]
    m = np.zeros((b_, 1, t_, s_), bool)
    for b in range(b_):
        for i in range(t_):
            for j in range(s_):
                m[b, 0, i, j] = bool(q_valid[b, i]) and bool(kv_valid[b, j])
    return m


def segment_mask_ref(q_segments, kv_segments=None):
    """[B, 1, T, S] bool: same non-zero segment id (0 = padding, sees and is seen by none)."""
    q_segments = np.asarray(q_segments)
    kv_segments = q_segments if kv_segments is None else np.asarray(kv_segments)
    b_, t_ = q_segments.shape
    s_ = kv_segments.shape[1]
    m = np.zeros((b_, 1, t_, s_), bool)
    for b in range(b_):
        for i in range(t_):
            for j in range(s_):
                qs, ks = int(q_segments[b, i]), int(kv_segments[b, j])
                m[b, 0, i, j] = qs != 0 and qs == ks
    return m


def combine_masks_ref(*masks):
    """Elementwise AND of the non-None masks (broadcast); None if there are none."""
    masks = [np.asarray(m, bool) for m in masks if m is not None]
    if not masks:
        return None
    shape = np.broadcast_shapes(*(m.shape for m in masks))
    out = np.ones(shape, bool)
    for m in masks:
        out = out & np.broadcast_to(m, shape)
    return out


# ---------------------------------------------------------------------------- positions


def sinusoidal_positions_ref(num_positions, dim, max_timescale=10_000.0):
    """[P, D]: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same) (Vaswani §3.5)."""
    pe = np.zeros((num_positions, dim))
    for p in range(num_positions):
        for i in range(dim // 2):
            angle = p / max_timescale ** (2 * i / dim)
            pe[p, 2 * i] = math.sin(angle)
            pe[p, 2 * i + 1] = math.cos(angle)
    return pe


def learned_positions_ref(table, positions):
    """[B, T, D]: row positions[b, t] of table [P, D]."""
    table = np.asarray(table, np.float64)
    positions = np.asarray(positions)
    b_, t_ = positions.shape
    out = np.zeros((b_, t_, table.shape[1]))
    for b in range(b_):
        for t in range(t_):
            out[b, t] = table[int(positions[b, t])]
    return out


def rope_frequencies_ref(head_dim, theta=10_000.0):
    """[H/2]: theta^(-2i/H), i = 0 .. H/2 - 1 (Su et al. 2021)."""
    return np.array([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)])


def llama3_rope_frequencies_ref(
    head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_position
):
    """[H/2]: Meta's llama3 rescaling of each frequency f, one at a time (float64).

    Wavelength w = 2 pi / f against the pretraining context L: w < L / high keeps f,
    w > L / low gives f / factor, in between s = (L / w - low) / (high - low) and
    f' = (1 - s) f / factor + s f.
    """
    out = []
    for f in rope_frequencies_ref(head_dim, theta):
        w = 2 * math.pi / f
        if w < original_max_position / high_freq_factor:
            out.append(f)
        elif w > original_max_position / low_freq_factor:
            out.append(f / factor)
        else:
            s = (original_max_position / w - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


def apply_rope_ref(x, positions, theta=10_000.0, inv_freq=None):
    """Rotate-half RoPE (GPT-NeoX / LLaMA): pair (i, i + H/2) rotated by p * inv_freq[i].

    Each pair is the 2-vector (x[i], x[i + H/2]) multiplied by the rotation matrix
    [[cos a, -sin a], [sin a, cos a]], a = position * inv_freq[i].

    Args:
      x: [B, T, N, H].
      positions: [B, T] integer positions.

    Returns:
      [B, T, N, H] float64.
    """
    x = np.asarray(x, np.float64)
    positions = np.asarray(positions)
    b_, t_, n_, h_ = x.shape
    half = h_ // 2
    inv = rope_frequencies_ref(h_, theta) if inv_freq is None else np.asarray(inv_freq, float)
    out = np.zeros_like(x)
    for b in range(b_):
        for t in range(t_):
            for i in range(half):
                a = float(positions[b, t]) * float(inv[i])
                rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
                for n in range(n_):
                    pair = np.array([x[b, t, n, i], x[b, t, n, i + half]])
                    out[b, t, n, i], out[b, t, n, i + half] = rot @ pair
    return out


def t5_relative_position_bucket_one(
    relative_position, bidirectional=True, num_buckets=32, max_distance=128
):
    """The T5 bucket of one relative position (key - query), in Python integers.

    Mesh TensorFlow's `_relative_position_bucket` / Hugging Face's
    `T5Attention._relative_position_bucket`: half of the buckets (all when causal) hold exact
    distances 0 .. max_exact - 1, the rest are logarithmic up to max_distance, beyond which
    everything shares the last bucket. Bidirectional: keys to the right (rel > 0) use the
    upper half. Causal: keys to the right fall into bucket 0.
    """
    rel = int(relative_position)
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            bucket += num_buckets
        n = abs(rel)
    else:
        n = max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return bucket + min(large, num_buckets - 1)


def t5_relative_position_bucket_ref(
    relative_position, bidirectional=True, num_buckets=32, max_distance=128
):
    """Elementwise `t5_relative_position_bucket_one` over an integer array of any shape."""
    rel = np.asarray(relative_position)
    out = np.zeros(rel.shape, np.int64)
    for idx in np.ndindex(rel.shape):
        out[idx] = t5_relative_position_bucket_one(
            rel[idx], bidirectional, num_buckets, max_distance
        )
    return out


def t5_relative_position_bias_ref(table, q_positions, k_positions, bidirectional, max_distance=128):
    """[B, N, T, S]: bias[b, n, t, s] = table[bucket(k_pos[b, s] - q_pos[b, t]), n].

    Args:
      table: [U, N] learned bias per bucket and head (U buckets).
      q_positions: [B, T]; k_positions: [B, S] (B may be 1 on both).
    """
    table = np.asarray(table, np.float64)
    q_positions = np.asarray(q_positions)
    k_positions = np.asarray(k_positions)
    u_, n_ = table.shape
    b_ = max(q_positions.shape[0], k_positions.shape[0])
    t_, s_ = q_positions.shape[1], k_positions.shape[1]
    out = np.zeros((b_, n_, t_, s_))
    for b in range(b_):
        qp = q_positions[min(b, q_positions.shape[0] - 1)]
        kp = k_positions[min(b, k_positions.shape[0] - 1)]
        for t in range(t_):
            for s in range(s_):
                bucket = t5_relative_position_bucket_one(
                    int(kp[s]) - int(qp[t]), bidirectional, u_, max_distance
                )
                out[b, :, t, s] = table[bucket]
    return out


# ---------------------------------------------------------------------------- norms


def layer_norm_ref(x, scale, bias=None, eps=1e-5):
    """LayerNorm (Ba et al. 2016) over the last axis: (x - mu) / sqrt(sigma^2 + eps) g + b.

    Biased (population) variance, as in every framework. x: [..., D]; scale, bias: [D] or
    None. Returns [..., D] float64.
    """
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        mu = math.fsum(row) / d
        var = math.fsum((row - mu) ** 2) / d
        out[idx] = (row - mu) / math.sqrt(var + eps)
    if scale is not None:
        out = out * np.asarray(scale, np.float64)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    return out


def rms_norm_ref(x, scale, eps=1e-6, scale_offset=0.0):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * (scale_offset + scale).

    x: [..., D]; scale: [D] or None. Returns [..., D] float64.
    """
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        out[idx] = row / math.sqrt(math.fsum(row**2) / d + eps)
    if scale is not None:
        out = out * (scale_offset + np.asarray(scale, np.float64))
    return out


def t5_layer_norm_ref(x, scale, eps=1e-6):
    """T5's LayerNorm: no mean subtraction, no bias, x / sqrt(mean(x^2) + eps) * scale."""
    return rms_norm_ref(x, scale, eps=eps)


# ---------------------------------------------------------------------------- activations

_erf = np.vectorize(math.erf, otypes=[np.float64])


def relu_ref(x):
    """max(x, 0), elementwise, float64."""
    x = np.asarray(x, np.float64)
    return np.where(x > 0, x, 0.0)


def gelu_ref(x):
    """Exact GELU (Hendrycks & Gimpel 2016): x * Phi(x) = x/2 (1 + erf(x / sqrt 2))."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh_ref(x):
    """GELU, tanh form: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _sigmoid(x):
    # Split by sign so exp never overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu_ref(x):
    """SiLU / swish (Elfwing et al. 2018; Ramachandran et al. 2017): x * sigmoid(x)."""
    x = np.asarray(x, np.float64)
    return x * _sigmoid(x)


_ACTIVATIONS_REF = {
    "relu": relu_ref,
    "gelu": gelu_ref,
    "gelu_tanh": gelu_tanh_ref,
    "silu": silu_ref,
}


def glu_ref(gate, up, activation="silu"):
    """Gated linear unit (Shazeer 2020): act(gate) * up; gate, up: [..., F]."""
    return _ACTIVATIONS_REF[activation](gate) * np.asarray(up, np.float64)


def swiglu_ref(gate, up):
    """silu(gate) * up."""
    return glu_ref(gate, up, "silu")


def geglu_ref(gate, up):
    """gelu_tanh(gate) * up (T5 v1.1 checkpoints)."""
    return glu_ref(gate, up, "gelu_tanh")


# ---------------------------------------------------------------------------- losses


def logsumexp_ref(logits):
    """[...]: log sum_v exp(x_v), with the max shifted out, per row of [..., V]."""
    x = np.asarray(logits, np.float64)
    out = np.zeros(x.shape[:-1])
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        m = float(np.max(row))
        out[idx] = m + math.log(math.fsum(np.exp(row - m)))
    return out


def log_softmax_ref(logits):
    """[..., V]: log p_v = x_v - logsumexp(x)."""
    x = np.asarray(logits, np.float64)
    return x - logsumexp_ref(x)[..., None]


def softmax_ref(logits):
    """[..., V]: p_v = exp(x_v) / sum_u exp(x_u), each row summed exactly (math.fsum)."""
    x = np.asarray(logits, np.float64)
    out = np.zeros(x.shape)
    for idx in np.ndindex(x.shape[:-1]):
        e = [math.exp(v - float(np.max(x[idx]))) for v in x[idx]]
        total = math.fsum(e)
        out[idx] = [v / total for v in e]
    return out


def cross_entropy_ref(logits, labels, weights=None, label_smoothing=0.0, z_loss=0.0):
    """(sum_i w_i loss_i, sum_i w_i) with PyTorch's label smoothing and PaLM's z-loss.

    loss_i = (1 - eps) (-log p_i[y_i]) + eps mean_v(-log p_i[v]) + z_loss logsumexp_i^2,
    i.e. cross-entropy against the target (1 - eps) onehot(y) + eps / V.

    Args:
      logits: [..., V]; labels: integer [...]; weights: [...] or None (ones).

    Returns:
      Two Python floats.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    logp = log_softmax_ref(logits)
    lse = logsumexp_ref(logits)
    weights = np.ones(labels.shape) if weights is None else np.asarray(weights, np.float64)
    total, count = [], []
    for idx in np.ndindex(labels.shape):
        nll = -logp[idx][int(labels[idx])]
        smooth = -math.fsum(logp[idx]) / logp.shape[-1]
        loss = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse[idx] ** 2
        total.append(weights[idx] * loss)
        count.append(weights[idx])
    return math.fsum(total), math.fsum(count)


def cross_entropy_grad_ref(logits, labels, weights=None, label_smoothing=0.0, z_loss=0.0):
    """[..., V]: d(loss sum of `cross_entropy_ref`)/d(logits), from the closed form.

    With target t = (1 - eps) onehot(y) + eps / V and p = softmax(x):
    d/dx_v [CE(t, p) + z lse^2] = w (p_v - t_v + 2 z lse p_v).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    v_ = logits.shape[-1]
    p = np.exp(log_softmax_ref(logits))
    lse = logsumexp_ref(logits)
    weights = np.ones(labels.shape) if weights is None else np.asarray(weights, np.float64)
    grad = np.zeros_like(logits)
    for idx in np.ndindex(labels.shape):
        target = np.full(v_, label_smoothing / v_)
        target[int(labels[idx])] += 1.0 - label_smoothing
        grad[idx] = weights[idx] * (p[idx] - target + 2.0 * z_loss * lse[idx] * p[idx])
    return grad


def accuracy_ref(logits, labels, weights=None):
    """(sum of w where the first argmax equals the label, sum of w)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    weights = np.ones(labels.shape) if weights is None else np.asarray(weights, np.float64)
    correct, count = 0.0, 0.0
    for idx in np.ndindex(labels.shape):
        row = list(logits[idx])
        if row.index(max(row)) == int(labels[idx]):
            correct += weights[idx]
        count += weights[idx]
    return correct, count


def kl_divergence_ref(p_logits, q_logits, weights=None, temperature=1.0):
    """(sum_i w_i KL(p_i || q_i), sum_i w_i), p = softmax(p_logits / T), q likewise.

    KL(p || q) = sum_v p_v (log p_v - log q_v); terms with p_v == 0 contribute 0.
    """
    log_p = log_softmax_ref(np.asarray(p_logits, np.float64) / temperature)
    log_q = log_softmax_ref(np.asarray(q_logits, np.float64) / temperature)
    lead = log_p.shape[:-1]
    weights = np.ones(lead) if weights is None else np.asarray(weights, np.float64)
    total, count = [], []
    for idx in np.ndindex(lead):
        kl = math.fsum(
            math.exp(lp) * (lp - lq) for lp, lq in zip(log_p[idx], log_q[idx], strict=True)
        )
        total.append(weights[idx] * kl)
        count.append(weights[idx])
    return math.fsum(total), math.fsum(count)


# ---------------------------------------------------------------------------- dropout


def dropout_ref(x, rate, keep):
    """Inverted dropout given the keep pattern: x / (1 - rate) where keep, else 0.

    The random draw itself has no twin; tests recover `keep` from the op's output and check
    the statistics of the draw separately.
    """
    x = np.asarray(x, np.float64)
    return np.where(np.asarray(keep, bool), x / (1.0 - rate), 0.0)


# ---------------------------------------------------------------------------- word2vec


def _log_sigmoid_ref(x):
    # log σ(x) = -log(1 + e^-x), written so that neither branch overflows.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def negative_sampling_loss_ref(h, rows, weights):
    """-w_0 log σ(h·r_0) - Σ_{k>=1} w_k log σ(-h·r_k) summed over examples, and Σ w_0.

    Mikolov et al. 2013, eq. 4. h [P, D], rows [P, K, D] (true word first), weights [P, K].
    """
    h = np.asarray(h, np.float64)
    rows = np.asarray(rows, np.float64)
    weights = np.asarray(weights, np.float64)
    total, count = [], []
    for p in range(h.shape[0]):
        for k in range(rows.shape[1]):
            dot = math.fsum(float(a) * float(b) for a, b in zip(h[p], rows[p, k], strict=True))
            total.append(-weights[p, k] * _log_sigmoid_ref(dot if k == 0 else -dot))
        count.append(weights[p, 0])
    return math.fsum(total), math.fsum(count)


def hierarchical_softmax_loss_ref(h, nodes, codes, mask):
    """-Σ_l m_l log σ(±h·n_l), + for code 0 and - for code 1, summed; and the paths counted.

    h [P, D], nodes [P, L, D], codes and mask [P, L].
    """
    h = np.asarray(h, np.float64)
    nodes = np.asarray(nodes, np.float64)
    total, count = [], 0.0
    for p in range(h.shape[0]):
        for l in range(nodes.shape[1]):
            if not mask[p][l]:
                continue
            dot = math.fsum(float(a) * float(b) for a, b in zip(h[p], nodes[p, l], strict=True))
            total.append(-_log_sigmoid_ref(dot if int(codes[p][l]) == 0 else -dot))
        count += 1.0 if any(mask[p]) else 0.0
    return math.fsum(total), count


# ---------------------------------------------------------------------------- LoRA


def lora_dense_ref(x, kernel, lora_a, lora_b, scale, bias=None):
    """x W + b + scale * (x A) B for a kernel [in..., out...] (Hu et al. 2021, eq. 3).

    Args:
      x: [..., in...] (the trailing axes are the kernel's input axes, in its order).
      kernel: W [in..., out...]; lora_a: A [in..., R]; lora_b: B [R, out...].
      scale: alpha / r.
      bias: [out...] or None.

    Returns:
      [..., out...] float64, one output element at a time.
    """
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    lora_a, lora_b = np.asarray(lora_a, np.float64), np.asarray(lora_b, np.float64)
    n_in = lora_a.ndim - 1
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    xs = x.reshape(-1, math.prod(in_shape))
    w = kernel.reshape(math.prod(in_shape), -1)
    a = lora_a.reshape(-1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1)
    out = np.zeros((xs.shape[0], w.shape[1]))
    for row in range(xs.shape[0]):
        h = [sum(xs[row, i] * a[i, k] for i in range(a.shape[0])) for k in range(a.shape[1])]
        for o in range(w.shape[1]):
            base = sum(xs[row, i] * w[i, o] for i in range(w.shape[0]))
            out[row, o] = base + scale * sum(h[k] * b[k, o] for k in range(b.shape[0]))
    if bias is not None:
        out = out + np.asarray(bias, np.float64).reshape(1, -1)
    return out.reshape(*lead, *out_shape)
