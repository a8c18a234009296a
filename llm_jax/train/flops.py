"""Model FLOPs per token, accelerator peak FLOP/s and model FLOPs utilisation (MFU).

Convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1;
Chowdhery et al. 2022, "PaLM", appendix B):

  training FLOPs per token = 6·N + 12·L·T·(N_heads·H)

where N counts the matmul weights a token passes through and T is the attention context.
A multiply-add is 2 FLOPs; the backward pass costs twice the forward, hence 6 = 3 × 2.
The attention term is QKᵀ plus AV (2·2·T·N_heads·H per token per layer forward) over the
full T×T score matrix: causal masking is not discounted (PaLM's convention), so numbers
compare across papers and with MaxText / Levanter.

What N includes: every matmul weight — attention q, k, v, o (k and v with K ≤ N heads for
GQA), the MLP's two matrices (three when gated), and the output projection V·D, which
counts even when tied to the embedding because the matmul still runs. Embedding lookups,
norms, biases, activations, softmax and the loss are excluded (they are gathers or
element-wise, ≲1% for real sizes). These are *model* FLOPs: rematerialisation adds hardware
work but not model FLOPs, so MFU is comparable across remat policies.

A distillation run also runs its frozen teacher forward on every batch: 2·N_teacher +
attention per token, no backward (`teacher_flops_per_token`); MFU counts both models.

Peak FLOP/s are dense (no 2:4 sparsity) tensor-core / MXU numbers **per JAX device**; see
`PEAK_FLOPS` for the sources and the per-chip vs per-device caveat on TPU v2/v3.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import jax

from llm_jax.models.config import ModelConfig

if TYPE_CHECKING:
    from llm_jax.data.objectives import ObjectiveSpec

# Matmul-weight counts ----------------------------------------------------------------------


def _attention_params(cfg: ModelConfig) -> int:
    """q [D, N·H], k and v [D, K·H], o [N·H, D]: weights of one attention layer."""
    d, qw, kvw = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return d * qw + 2 * d * kvw + qw * d


def _mlp_params(cfg: ModelConfig) -> int:
    """wi (and wi_gate when gated) [D, F], wo [F, D]."""
    return (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_ff


def _vocab_head_params(cfg: ModelConfig, lm_head: bool) -> int:
    """The per-token head that ends in a V-wide projection (0 when it does not run)."""
    if not lm_head:
        return 0
    if cfg.family == "bert":
        if not cfg.use_mlm_head:
            return 0
        # MLM transform [D, E] then the (tied) decoder [E, V].
        return cfg.d_model * cfg.embed_dim + cfg.embed_dim * cfg.vocab_size
    return cfg.d_model * cfg.vocab_size


def matmul_params(cfg: ModelConfig, *, lm_head: bool = True) -> int:
    """N of "6N": matmul weights a token passes through, counted from the config.

    Embedding tables and norms are excluded; the output projection V·D is included (when
    `lm_head`) even if tied, since its matmul runs. ALBERT's shared layers count once per
    layer application (compute, not storage). For T5 this is encoder + decoder (with cross
    attention) + head, i.e. the per-token N only when source and target tokens are equally
    many; use `model_flops_per_sequence` for T5 accounting.

    Args:
      cfg: the model architecture.
      lm_head: count the vocabulary projection (False for classification fine-tuning or
        feature extraction, where it never runs).

    Returns:
      The number of matmul weights (an int, not bytes).
    """
    block = _attention_params(cfg) + _mlp_params(cfg)
    head = _vocab_head_params(cfg, lm_head)
    if cfg.family == "t5":
        cross = _attention_params(cfg)
        return cfg.num_layers * block + cfg.num_decoder_layers * (block + cross) + head
    n = cfg.num_layers * block + head
    if cfg.family == "bert" and cfg.embed_dim != cfg.d_model:
        n += cfg.embed_dim * cfg.d_model  # ALBERT's embedding projection [E, D]
    return n


# FLOPs -------------------------------------------------------------------------------------


def _check_lengths(cfg: ModelConfig, seq_len, enc_len, dec_len) -> None:
    if cfg.family == "t5":
        if seq_len is not None or enc_len is None or dec_len is None:
            raise ValueError(
                "family='t5' counts the encoder and decoder separately: pass enc_len= (source "
                "tokens) and dec_len= (target tokens), not seq_len."
            )
        lengths = {"enc_len": enc_len, "dec_len": dec_len}
    else:
        if seq_len is None or enc_len is not None or dec_len is not None:
            raise ValueError(
                f"family={cfg.family!r} takes seq_len= (tokens per sequence); enc_len/dec_len "
                "are for family='t5'."
            )
        lengths = {"seq_len": seq_len}
    for name, value in lengths.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")


def model_flops_per_sequence(
    cfg: ModelConfig,
    seq_len: int | None = None,
    *,
    enc_len: int | None = None,
    dec_len: int | None = None,
    training: bool = True,
    lm_head: bool = True,
) -> float:
    """Model FLOPs to process one sequence (one example): forward, or forward + backward.

    GPT / BERT: `seq_len` tokens through every layer; attention over `seq_len` keys; BERT's
    per-sequence heads (pooler, NSP, classifier) run once. T5: `enc_len` source tokens
    through the encoder; `dec_len` target tokens through the decoder (self attention over
    `dec_len` keys, cross attention over `enc_len` keys) and the head; each decoder layer
    also projects the `enc_len` encoder outputs to cross-attention keys and values.

    Args:
      cfg: the model architecture.
      seq_len: tokens per sequence (GPT, BERT).
      enc_len: source tokens per example (T5).
      dec_len: target tokens per example (T5).
      training: True: forward + backward (3 × forward); False: forward only.
      lm_head: count the vocabulary projection (see `matmul_params`).

    Returns:
      FLOPs per sequence (float).
    """
    _check_lengths(cfg, seq_len, enc_len, dec_len)
    head = _vocab_head_params(cfg, lm_head)
    if cfg.family == "t5":
        forward = _encoder_decoder_forward(cfg, enc_len, dec_len, head)
    else:
        forward = _single_stack_forward(cfg, seq_len, head)
    return float(3 * forward if training else forward)


def _attention_flops(cfg: ModelConfig, q_len: int, k_len: int) -> int:
    """QK^T [T, S] and AV of one layer, each 2·T·S·(N·H) FLOPs."""
    return 4 * q_len * k_len * cfg.num_heads * cfg.head_dim


def _single_stack_forward(cfg: ModelConfig, t: int, head: int) -> int:
    """Forward FLOPs of one T-token sequence through a GPT or BERT."""
    d = cfg.d_model
    per_token = cfg.num_layers * (_attention_params(cfg) + _mlp_params(cfg)) + head
    if cfg.family == "bert" and cfg.embed_dim != d:
        per_token += cfg.embed_dim * d
    forward = 2 * t * per_token + cfg.num_layers * _attention_flops(cfg, t, t)
    if cfg.family == "bert":
        # Heads on the first token only: pooler [D, D], NSP [D, 2], classifier [D, C].
        pooled = (d * d if cfg.use_pooler else 0) + (2 * d if cfg.use_nsp else 0)
        pooled += d * cfg.num_labels
        forward += 2 * pooled
    return forward


def _encoder_decoder_forward(cfg: ModelConfig, s: int, t: int, head: int) -> int:
    """Forward FLOPs of a T5 example: S source tokens, T target tokens."""
    qw, kvw, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.d_model
    block = _attention_params(cfg) + _mlp_params(cfg)
    encoder = 2 * s * cfg.num_layers * block + cfg.num_layers * _attention_flops(cfg, s, s)
    cross_q_o = 2 * d * qw  # cross-attention q and o run on decoder tokens
    cross_k_v = 2 * d * kvw  # cross-attention k and v run on encoder outputs
    decoder = (
        2 * t * cfg.num_decoder_layers * (block + cross_q_o)
        + 2 * s * cfg.num_decoder_layers * cross_k_v
        + cfg.num_decoder_layers * (_attention_flops(cfg, t, t) + _attention_flops(cfg, t, s))
        + 2 * t * head
    )
    return encoder + decoder


def model_flops_per_token(
    cfg: ModelConfig,
    seq_len: int | None = None,
    *,
    enc_len: int | None = None,
    dec_len: int | None = None,
    training: bool = True,
    lm_head: bool = True,
) -> float:
    """Model FLOPs per token: `model_flops_per_sequence / tokens per sequence`.

    GPT / BERT: per token of the `seq_len`-token sequence; for GPT this is exactly
    6·N + 12·L·T·(N_heads·H) with N = `matmul_params(cfg)` (2·N + 4·L·T·N_heads·H forward).
    T5: per token of source **plus** target (`enc_len + dec_len`), so pair it with a
    tokens/s that counts encoder and decoder tokens. Arguments as in
    `model_flops_per_sequence`.
    """
    per_sequence = model_flops_per_sequence(
        cfg, seq_len, enc_len=enc_len, dec_len=dec_len, training=training, lm_head=lm_head
    )
    tokens = enc_len + dec_len if cfg.family == "t5" else seq_len
    return per_sequence / tokens


def flops_and_tokens(cfg: ModelConfig, spec: ObjectiveSpec, batch) -> tuple[float, int]:
    """(training FLOPs per token, tokens per step) of `spec`'s batches shaped like `batch`.

    Tokens are the elements of `spec.token_fields` (T5: source plus target tokens); two
    fields are an encoder and a decoder sequence.
    """
    lengths = [batch[f].shape[1] for f in spec.token_fields]
    tokens = sum(int(batch[f].size) for f in spec.token_fields)
    if len(lengths) == 2:
        return model_flops_per_token(cfg, enc_len=lengths[0], dec_len=lengths[1]), tokens
    return model_flops_per_token(cfg, lengths[0], lm_head=spec.lm_head), tokens


def teacher_flops_per_token(teacher: ModelConfig, spec: ObjectiveSpec, batch) -> float:
    """Forward-only FLOPs per token of a distillation teacher (`llm_jax.compress.distill`)
    on `spec`'s batches shaped like `batch`: 2·N_teacher + 4·L·T·(N_heads·H), no backward
    (the teacher is frozen). Its vocabulary head always runs (the KL term reads its
    logits); BERT's per-sequence heads (pooler, NSP) never do.

    Raises:
      ValueError: an encoder-decoder objective (distillation has none).
    """
    if len(spec.token_fields) != 1:
        raise ValueError(f"objective {spec.name!r} has no distillation teacher to count.")
    seq_len = batch[spec.token_fields[0]].shape[1]
    if teacher.family == "bert":
        teacher = teacher.replace(use_pooler=False, use_nsp=False, num_labels=0)
    return model_flops_per_token(teacher, seq_len, training=False)


def inference_flops_per_token(
    cfg: ModelConfig,
    seq_len: int | None = None,
    *,
    enc_len: int | None = None,
    dec_len: int | None = None,
    lm_head: bool = True,
) -> float:
    """Forward-only model FLOPs per token (2·N + attention); see `model_flops_per_token`.

    For one cached decoding step of a GPT this is the cost of the new token attending over
    a `seq_len`-token context (the full-context convention, an upper bound for short ones).
    """
    return model_flops_per_token(
        cfg, seq_len, enc_len=enc_len, dec_len=dec_len, training=False, lm_head=lm_head
    )


# Peak FLOP/s -------------------------------------------------------------------------------

_TPU_V2 = {"bfloat16": 45e12 / 2}
_TPU_V3 = {"bfloat16": 123e12 / 2}
_TPU_V4 = {"bfloat16": 275e12}
_TPU_V5E = {"bfloat16": 197e12}
_TPU_V5P = {"bfloat16": 459e12}
_TPU_V6E = {"bfloat16": 918e12}
_H100_SXM = {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12, "float8": 1979e12}
_H100_NVL = {"bfloat16": 835.5e12, "float16": 835.5e12, "float32": 417.5e12, "float8": 1670.5e12}

PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Google Cloud TPU docs (cloud.google.com/tpu/docs/v2 ... /v6e), bf16 per chip:
    # v2 45 T, v3 123 T, v4 275 T, v5e 197 T, v5p 459 T, v6e (Trillium) 918 T. On v2 and
    # v3 each of a chip's two TensorCores is its own JAX device, so the per-device peak is
    # half; v4 and v5p ("megacore") and v5e / v6e (one core) have one device per chip.
    # f32 matmuls at JAX's default precision run as one bf16 MXU pass on TPU, so "float32"
    # falls back to these numbers (see `peak_flops_per_device`).
    "TPU v2": _TPU_V2,
    "TPU v3": _TPU_V3,
    "TPU v4": _TPU_V4,
    "TPU v5 lite": _TPU_V5E,
    "TPU v5e": _TPU_V5E,
    "TPU v5": _TPU_V5P,  # how older jaxlibs name v5p
    "TPU v5p": _TPU_V5P,
    "TPU v6 lite": _TPU_V6E,
    # NVIDIA datasheets, dense tensor-core numbers (the sheets quote 2:4 sparsity, 2x
    # these). "float32" is TF32: JAX's default matmul precision lets XLA:GPU use TF32 for
    # f32 dots on Ampere and newer (with jax_default_matmul_precision='highest' the true
    # FP32 peak applies: A100 19.5 T, H100 SXM 67 T).
    # A100 datasheet (SXM and PCIe, 40 and 80 GB alike): BF16/FP16 312 T, TF32 156 T.
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    # H100 datasheet: SXM BF16/FP16 989 T, TF32 494.5 T, FP8 1979 T; PCIe 756 / 378 / 1513;
    # NVL 835.5 / 417.5 / 1670.5. H200 (SXM) has H100 SXM's compute, H200 NVL H100 NVL's.
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": {
        "bfloat16": 756e12,
        "float16": 756e12,
        "float32": 378e12,
        "float8": 1513e12,
    },
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H200 NVL": _H100_NVL,
    # L4 datasheet: BF16/FP16 121 T, TF32 60 T, FP8 242.5 T.
    "NVIDIA L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12, "float8": 242.5e12},
    # L40S datasheet: BF16/FP16 362 T, TF32 183 T, FP8 733 T.
    "NVIDIA L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12, "float8": 733e12},
    # A10 datasheet: BF16/FP16 125 T, TF32 62.5 T.
    "NVIDIA A10": {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12},
    # AWS's A10G has no NVIDIA datasheet; 70 T BF16/FP16 is the commonly quoted figure
    # (e.g. Baseten's "A10 vs A10G" note). Treat it as approximate; no TF32 figure.
    "NVIDIA A10G": {"bfloat16": 70e12, "float16": 70e12},
    # Turing / Volta have FP16 tensor cores but no BF16 or TF32 ones: "bfloat16" maps to
    # the FP16 ceiling (so bf16 MFU reads low there, as it should) and "float32" is the
    # CUDA-core FP32 peak. T4 datasheet: FP16 65 T, FP32 8.1 T. V100 datasheet: SXM2
    # 125 T / 15.7 T, PCIe 112 T / 14 T, V100S 130 T / 16.4 T.
    "Tesla T4": {"bfloat16": 65e12, "float16": 65e12, "float32": 8.1e12},
    "Tesla V100-SXM2-16GB": {"bfloat16": 125e12, "float16": 125e12, "float32": 15.7e12},
    "Tesla V100-PCIE-16GB": {"bfloat16": 112e12, "float16": 112e12, "float32": 14e12},
    "Tesla V100S-PCIE-32GB": {"bfloat16": 130e12, "float16": 130e12, "float32": 16.4e12},
}

# Other spellings of the same parts (memory size, form factor, driver naming), matched on
# the lower-cased device_kind in order; the first match wins.
_KIND_ALIASES: tuple[tuple[str, str], ...] = (
    (r"h100.*pcie", "NVIDIA H100 PCIe"),
    (r"h100.*nvl", "NVIDIA H100 NVL"),
    (r"h100", "NVIDIA H100 80GB HBM3"),
    (r"h200.*nvl", "NVIDIA H200 NVL"),
    (r"h200", "NVIDIA H200"),
    (r"a100", "NVIDIA A100-SXM4-80GB"),
    (r"a10g", "NVIDIA A10G"),
    (r"\ba10\b", "NVIDIA A10"),
    (r"l40s", "NVIDIA L40S"),
    (r"\bl4\b", "NVIDIA L4"),
    (r"\bt4\b", "Tesla T4"),
    (r"v100s", "Tesla V100S-PCIE-32GB"),
    (r"v100.*pcie", "Tesla V100-PCIE-16GB"),
    (r"v100", "Tesla V100-SXM2-16GB"),
)

DTYPES = ("bfloat16", "float16", "float32", "float8")


def _table_entry(kind: str) -> dict[str, float] | None:
    if kind in PEAK_FLOPS:
        return PEAK_FLOPS[kind]
    lower = kind.lower()
    for pattern, key in _KIND_ALIASES:
        if re.search(pattern, lower):
            return PEAK_FLOPS[key]
    return None


def peak_flops_per_device(
    device: jax.Device | None = None, dtype: str = "bfloat16"
) -> float | None:
    """Dense peak FLOP/s of one JAX device for matmuls in `dtype`, or None if unknown.

    Args:
      device: a JAX device (anything with `.device_kind`); default the first local one.
      dtype: compute dtype: "bfloat16", "float16", "float32" (JAX default precision: TF32
        on NVIDIA Ampere+, one bf16 pass on TPU) or "float8".

    Returns:
      FLOP/s, or None for kinds not in `PEAK_FLOPS` (CPUs, unlisted accelerators) and for
      dtypes the part has no number for, so MFU reads "n/a" instead of a guess.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}.")
    device = jax.local_devices()[0] if device is None else device
    entry = _table_entry(device.device_kind)
    if entry is None:
        return None
    if dtype not in entry and dtype == "float32" and device.device_kind.startswith("TPU"):
        return entry.get("bfloat16")
    return entry.get(dtype)


def mfu(
    tokens_per_second: float | None,
    flops_per_token: float,
    num_devices: int,
    peak: float | None,
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak.

    Args:
      tokens_per_second: global throughput (all devices together), or None if not measured.
      flops_per_token: from `model_flops_per_token` (training) or `inference_flops_per_token`.
      num_devices: devices the throughput ran on.
      peak: per-device peak FLOP/s from `peak_flops_per_device`, or None if unknown.

    Returns:
      A fraction (0.42 means 42%), or None when the throughput or the peak is unknown.
    """
    if tokens_per_second is None or peak is None or peak <= 0:
        return None
    if num_devices < 1:
        raise ValueError(f"num_devices={num_devices} must be >= 1.")
    return tokens_per_second * flops_per_token / (num_devices * peak)


def format_mfu(value: float | None) -> str:
    """'41.3%' for 0.413; 'n/a' when the peak (or throughput) is unknown."""
    return "n/a" if value is None else f"{100 * value:.1f}%"
