"""Hugging Face `config.json` <-> `ModelConfig`, for GPT-2, LLaMA, BERT and T5.

Both generations of `config.json` are read:

- transformers 4.x writes e.g. a top-level `rope_theta` (and `rope_scaling`), and T5's
  `tie_word_embeddings` means "tied head with decoder outputs scaled by D^-0.5";
- transformers 5.x writes `rope_parameters: {rope_theta, rope_type}`, and for T5 always
  `tie_word_embeddings: true` plus `scale_decoder_outputs` for the D^-0.5 scaling (a v1.1
  checkpoint is untied because its `lm_head.weight` differs from `shared.weight`).

A field is either honoured, or irrelevant to the forward pass (dropout, initialisation,
caching, generation defaults), or refused: a value we cannot honour raises
`UnsupportedConfigError` naming the field, never a silent default. Missing fields take the
defaults of the transformers config classes.

Exported configs are written so that both 4.x and 5.x read them the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from llm_jax.models.config import ModelConfig

SUPPORTED_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
    "GPT2ForSequenceClassification": "gpt2",
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "LlamaForSequenceClassification": "llama",
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForPreTraining": "bert",
    "BertForSequenceClassification": "bert",
    "T5ForConditionalGeneration": "t5",
}
# The architecture assumed when config.json names none.
DEFAULT_ARCHITECTURE = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "bert": "BertModel",
    "t5": "T5ForConditionalGeneration",
}

# Decoder classes with a bias-free `score` head [C, D] on the last real token and no LM head.
SEQUENCE_CLASSIFIERS = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
}

# HF activation names (transformers.activations.ACT2FN) -> ours.
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # the same tanh formula, written differently
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


class UnsupportedConfigError(ValueError):
    """A Hugging Face config asks for something our models do not implement."""


@dataclasses.dataclass(frozen=True)
class HFSpec:
    """What `config.json` says beyond the architecture itself.

    Attributes:
      architecture: the transformers class, e.g. "GPT2LMHeadModel".
      model_type: "gpt2", "llama", "bert" or "t5".
      bos_id / eos_id / pad_id / decoder_start_id: special ids from the config (None when
        absent); `eos_ids` lists every EOS id when the config gives several.
    """

    architecture: str
    model_type: str
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    decoder_start_id: int | None = None

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None


def _refuse(field: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"config.json: {field}={value!r} cannot be honoured: {why}")


def _activation(field: str, name: str) -> str:
    if name not in _ACTIVATIONS:
        raise _refuse(field, name, f"supported activations are {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def architecture_of(hf: Mapping[str, Any]) -> tuple[str, str]:
    """(architecture, model_type) of a config, or UnsupportedConfigError naming what is."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if archs:
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedConfigError(
                f"config.json: architecture {arch!r} is not supported; supported are "
                f"{sorted(SUPPORTED_ARCHITECTURES)}."
            )
        return arch, SUPPORTED_ARCHITECTURES[arch]
    if model_type in DEFAULT_ARCHITECTURE:
        return DEFAULT_ARCHITECTURE[model_type], model_type
    raise UnsupportedConfigError(
        f"config.json: model_type {model_type!r} (no `architectures`) is not supported; "
        f"supported model types are {sorted(DEFAULT_ARCHITECTURE)}."
    )


def spec_of(hf: Mapping[str, Any]) -> HFSpec:
    """The architecture and special token ids of a config."""
    arch, model_type = architecture_of(hf)
    return HFSpec(
        architecture=arch,
        model_type=model_type,
        bos_id=_int_or_none(hf.get("bos_token_id")),
        eos_ids=_ids(hf.get("eos_token_id", 1 if model_type == "t5" else None)),
        pad_id=_int_or_none(hf.get("pad_token_id", 0 if model_type in ("t5", "bert") else None)),
        decoder_start_id=_int_or_none(
            hf.get("decoder_start_token_id", 0 if model_type == "t5" else None)
        ),
    )


def _same(weights: Mapping[str, np.ndarray], a: str, b: str) -> bool:
    return np.array_equal(np.asarray(weights[a], np.float32), np.asarray(weights[b], np.float32))


# --- import ---------------------------------------------------------------------------------


def config_from_hf(
    hf: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None = None
) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config dict.

    Args:
      hf: the parsed `config.json`.
      weights: the checkpoint's tensors under normalised keys (see `hf_weights`), when at
        hand. They decide what the config cannot say: whether T5's head is tied, which
        BERT heads exist, the number of classifier labels. Without them the architecture
        and config fields decide.

    Raises:
      UnsupportedConfigError: an unsupported architecture or a field we cannot honour.
    """
    _, model_type = architecture_of(hf)
    return {
        "gpt2": _gpt2_config,
        "llama": _llama_config,
        "bert": _bert_config,
        "t5": _t5_config,
    }[model_type](hf, weights)


def _tied(hf, weights, head: str, embedding: str, default: bool) -> bool:
    """Whether the output head is the embedding, with the checkpoint cross-checked."""
    tied = bool(hf.get("tie_word_embeddings", default))
    if tied and weights is not None and head in weights and not _same(weights, head, embedding):
        raise UnsupportedConfigError(
            f"config.json says tie_word_embeddings=true but the checkpoint's {head!r} differs "
            f"from {embedding!r}; fix the config (tie_word_embeddings=false) or the weights."
        )
    return tied


def _gpt2_config(hf, weights) -> ModelConfig:
    for field, why in (
        ("scale_attn_by_inverse_layer_idx", "attention logits are not scaled by 1/layer index"),
        ("reorder_and_upcast_attn", "the reordered/upcast attention variant is not implemented"),
        ("add_cross_attention", "GPT-2 with cross-attention is not implemented"),
    ):
        if hf.get(field, False):
            raise _refuse(field, hf[field], why + "; set it to false.")
    d = int(hf.get("n_embd", 768))
    classifier = architecture_of(hf)[0] == SEQUENCE_CLASSIFIERS["gpt2"]
    return ModelConfig(
        family="gpt",
        vocab_size=int(hf.get("vocab_size", 50257)),
        d_model=d,
        num_layers=int(hf.get("n_layer", 12)),
        num_heads=int(hf.get("n_head", 12)),
        d_ff=int(hf.get("n_inner") or 4 * d),
        max_position_embeddings=int(hf.get("n_positions", 1024)),
        position="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=_activation("activation_function", hf.get("activation_function", "gelu_new")),
        use_bias=True,
        attention_scale=bool(hf.get("scale_attn_weights", True)),
        # A classifier has no LM head: logits, if asked for, come from the embedding.
        tie_embeddings=classifier or _tied(hf, weights, "lm_head.weight", "wte.weight", True),
        num_labels=score_labels(hf, weights) if classifier else 0,
        dropout_rate=float(hf.get("resid_pdrop", 0.1)),
        attention_dropout_rate=float(hf.get("attn_pdrop", 0.1)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


def rope_fields_of(hf: Mapping[str, Any]) -> dict[str, Any]:
    """`ModelConfig` RoPE fields of a 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) config: `rope_theta`, and for LLaMA 3.x's "llama3" rescaling
    `rope_type` with its factors (`original_max_position_embeddings` falls back to
    `max_position_embeddings`, as in transformers).

    Raises:
      UnsupportedConfigError: a rope type other than "default" and "llama3" (e.g. "linear",
        "dynamic", "yarn"), a llama3 section without its factors, or partial rotary
        embeddings.
    """
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise _refuse(
            field,
            rope,
            f"rope type {rope_type!r} is not implemented; 'default' and 'llama3' (LLaMA 3.1 / "
            "3.2) are.",
        )
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise _refuse(
            "partial_rotary_factor", factor, "RoPE on part of the head is not implemented."
        )
    fields: dict[str, Any] = {
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    }
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
        if missing:
            raise _refuse(field, rope, f"rope type 'llama3' needs {missing}.")
        original = rope.get("original_max_position_embeddings")
        fields.update(
            rope_type="llama3",
            rope_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_position=int(
                original if original is not None else hf.get("max_position_embeddings", 2048)
            ),
        )
    return fields


def _llama_config(hf, weights) -> ModelConfig:
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise UnsupportedConfigError(
            f"config.json: attention_bias={attention_bias} with mlp_bias={mlp_bias} cannot be "
            "honoured: our use_bias puts biases on every dense layer or on none."
        )
    d = int(hf.get("hidden_size", 4096))
    n = int(hf.get("num_attention_heads", 32))
    head_dim = hf.get("head_dim")
    arch = architecture_of(hf)[0]
    classifier = arch == SEQUENCE_CLASSIFIERS["llama"]
    return ModelConfig(
        family="gpt",
        vocab_size=int(hf.get("vocab_size", 32000)),
        d_model=d,
        num_layers=int(hf.get("num_hidden_layers", 32)),
        num_heads=n,
        num_kv_heads=int(hf.get("num_key_value_heads") or n),
        head_dim=None if head_dim in (None, d // n) else int(head_dim),
        d_ff=int(hf.get("intermediate_size", 11008)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        position="rope",
        **rope_fields_of(hf),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=_activation("hidden_act", hf.get("hidden_act", "silu")),
        gated_mlp=True,
        use_bias=attention_bias,
        # A bare LlamaModel (or a classifier) has no LM head: its hidden states are exact,
        # and logits come from the embedding (tied), as for GPT2Model.
        tie_embeddings=arch in ("LlamaModel", SEQUENCE_CLASSIFIERS["llama"])
        or _tied(hf, weights, "lm_head.weight", "embed_tokens.weight", False),
        num_labels=score_labels(hf, weights) if classifier else 0,
        dropout_rate=0.0,
        attention_dropout_rate=float(hf.get("attention_dropout") or 0.0),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


# BERT heads each architecture must have (normalised key -> what it is).
_BERT_HEAD_KEYS = {
    "pooler": "pooler.dense.weight",
    "mlm": "cls.predictions.transform.dense.weight",
    "nsp": "cls.seq_relationship.weight",
    "classifier": "classifier.weight",
}
_BERT_REQUIRED_HEADS = {
    "BertModel": (),
    "BertForMaskedLM": ("mlm",),
    "BertForPreTraining": ("pooler", "mlm", "nsp"),
    "BertForSequenceClassification": ("pooler", "classifier"),
}


def _num_labels(hf) -> int:
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def score_labels(hf: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None) -> int:
    """Classes of a GPT-2 / LLaMA sequence classifier: rows of `score.weight` when the
    tensors are at hand, else `id2label` / `num_labels` (transformers' default 2)."""
    if weights is not None and "score.weight" in weights:
        return int(weights["score.weight"].shape[0])
    return _num_labels(hf)


def bert_heads(hf: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """Which BERT heads a checkpoint has: from its tensors when given (a BertForMaskedLM
    checkpoint such as bert-base-uncased also carries the pooler and NSP head), else from
    the architecture. Heads the architecture needs but the tensors lack are left on, so
    that loading reports their keys as missing."""
    arch, _ = architecture_of(hf)
    required = set(_BERT_REQUIRED_HEADS[arch])
    if weights is None:
        present = set(required)
        if arch == "BertModel":
            present.add("pooler")  # BertModel's add_pooling_layer defaults to True
    else:
        present = {name for name, key in _BERT_HEAD_KEYS.items() if key in weights} | required
    if "classifier" in present:
        num_labels = (
            int(weights["classifier.weight"].shape[0])
            if weights is not None and "classifier.weight" in weights
            else _num_labels(hf)
        )
    else:
        num_labels = 0
    return {
        "use_pooler": "pooler" in present or "nsp" in present or num_labels > 0,
        "use_mlm_head": "mlm" in present,
        "use_nsp": "nsp" in present,
        "num_labels": num_labels,
    }


def _bert_config(hf, weights) -> ModelConfig:
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise _refuse(
            "position_embedding_type", kind, "only absolute (learned) positions are implemented."
        )
    for field in ("is_decoder", "add_cross_attention"):
        if hf.get(field, False):
            raise _refuse(field, hf[field], "BERT is used as a bidirectional encoder only.")
    heads = bert_heads(hf, weights)
    if heads["use_mlm_head"] and not hf.get("tie_word_embeddings", True):
        raise _refuse(
            "tie_word_embeddings", False, "our MLM decoder is always tied to the embeddings."
        )
    return ModelConfig(
        family="bert",
        vocab_size=int(hf.get("vocab_size", 30522)),
        d_model=int(hf.get("hidden_size", 768)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        d_ff=int(hf.get("intermediate_size", 3072)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        position="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        norm_position="post",
        final_norm=False,
        activation=_activation("hidden_act", hf.get("hidden_act", "gelu")),
        use_bias=True,
        tie_embeddings=True,
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        **heads,
    )


def _t5_ffn(proj: str) -> tuple[str, bool]:
    """(activation, gated) of T5's `feed_forward_proj`, as T5Config.__post_init__ reads it."""
    parts = proj.split("-")
    gated = parts[0] == "gated"
    if (len(parts) > 1 and not gated) or len(parts) > 2:
        raise _refuse("feed_forward_proj", proj, "use 'ACT' or 'gated-ACT'.")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # T5Config's own special case
    if act not in _ACTIVATIONS:
        raise _refuse(
            "feed_forward_proj", proj, f"the activation must be one of {sorted(_ACTIVATIONS)}."
        )
    return _ACTIVATIONS[act], gated


def t5_head(hf: Mapping[str, Any], weights: Mapping[str, np.ndarray] | None) -> tuple[bool, bool]:
    """(tie_embeddings, scale_tied_logits) of a T5 checkpoint, 4.x or 5.x.

    Scaling by D^-0.5: `scale_decoder_outputs` when present (5.x), else
    `tie_word_embeddings` (4.x). Tied: with the tensors at hand, when `lm_head.weight` is
    absent or equal to `shared.weight`; otherwise from `tie_word_embeddings` (5.x always
    writes true there, so a 5.x untied head is only recognisable from the tensors).
    """
    tie_flag = hf.get("tie_word_embeddings", True) is not False
    scale = bool(hf.get("scale_decoder_outputs", tie_flag))
    if weights is None:
        tied = tie_flag
    elif "lm_head.weight" not in weights:
        tied = True
    else:
        tied = _same(weights, "lm_head.weight", "shared.weight")
        if not tied and "scale_decoder_outputs" not in hf and tie_flag:
            raise UnsupportedConfigError(
                "config.json says tie_word_embeddings=true (transformers 4.x: tied head) but "
                "the checkpoint's 'lm_head.weight' differs from 'shared.weight'; fix the "
                "config (tie_word_embeddings=false for T5 v1.1) or the weights."
            )
    if scale and not tied:
        raise _refuse(
            "scale_decoder_outputs",
            True,
            "an untied T5 head with D^-0.5-scaled decoder outputs is not implemented "
            "(scale_tied_logits needs tied embeddings).",
        )
    return tied, scale


def _t5_config(hf, weights) -> ModelConfig:
    activation, gated = _t5_ffn(hf.get("feed_forward_proj", "relu"))
    if hf.get("is_decoder", False):
        raise _refuse("is_decoder", True, "T5ForConditionalGeneration is an encoder-decoder.")
    tied, scale = t5_head(hf, weights)
    d = int(hf.get("d_model", 512))
    n = int(hf.get("num_heads", 8))
    d_kv = int(hf.get("d_kv", 64))
    return ModelConfig(
        family="t5",
        vocab_size=int(hf.get("vocab_size", 32128)),
        d_model=d,
        num_layers=int(hf.get("num_layers", 6)),
        num_decoder_layers=_int_or_none(hf.get("num_decoder_layers")),
        num_heads=n,
        head_dim=None if d_kv * n == d else d_kv,
        d_ff=int(hf.get("d_ff", 2048)),
        position="relative",
        relative_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        norm="rmsnorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        activation=activation,
        gated_mlp=gated,
        use_bias=False,
        attention_scale=False,
        tie_embeddings=tied,
        scale_tied_logits=scale,
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        initializer_range=float(hf.get("initializer_factor", 1.0)),
    )


# --- export ---------------------------------------------------------------------------------

_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _rope_scaling_out(cfg: ModelConfig) -> dict[str, Any] | None:
    """The llama3 RoPE section as transformers writes it, or None for plain RoPE."""
    if cfg.rope_type != "llama3":
        return None
    return {
        "rope_type": "llama3",
        "factor": cfg.rope_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_position,
    }


def _require(cfg: ModelConfig, target: str, **expected: Any) -> None:
    bad = {k: getattr(cfg, k) for k, v in expected.items() if getattr(cfg, k) != v}
    if bad:
        want = {k: expected[k] for k in bad}
        raise UnsupportedConfigError(
            f"this model cannot be written as {target}: it has {bad}, {target} needs {want}."
        )


def _plain_heads(cfg: ModelConfig, arch: str) -> None:
    if cfg.num_kv_heads != cfg.num_heads:
        raise UnsupportedConfigError(f"{arch} has no grouped-query attention (num_kv_heads).")
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
        raise UnsupportedConfigError(f"{arch} needs head_dim = d_model / num_heads.")


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class our model is exported as."""
    if cfg.family == "gpt":
        model_type = "gpt2" if cfg.position == "learned" else "llama"
        if cfg.num_labels:
            return SEQUENCE_CLASSIFIERS[model_type]
        return "GPT2LMHeadModel" if model_type == "gpt2" else "LlamaForCausalLM"
    if cfg.family == "t5":
        return "T5ForConditionalGeneration"
    pooler, mlm, nsp, cls = cfg.use_pooler, cfg.use_mlm_head, cfg.use_nsp, cfg.num_labels > 0
    if mlm and nsp and pooler and not cls:
        return "BertForPreTraining"
    if mlm and not (nsp or pooler or cls):
        return "BertForMaskedLM"
    if cls and pooler and not (mlm or nsp):
        return "BertForSequenceClassification"
    if not (mlm or nsp or cls):
        return "BertModel"
    raise UnsupportedConfigError(
        f"no transformers BERT class has exactly these heads (use_pooler={pooler}, "
        f"use_mlm_head={mlm}, use_nsp={nsp}, num_labels={cfg.num_labels}); the exportable "
        "combinations are pooler+MLM+NSP (BertForPreTraining), MLM alone (BertForMaskedLM), "
        "pooler+classifier (BertForSequenceClassification) and no head (BertModel)."
    )


# What each transformers class hard-codes, checked before export (D7: one table, one check).
_REQUIRED: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        norm="layernorm",
        norm_position="pre",
        final_norm=True,
        gated_mlp=False,
        use_bias=True,
    ),
    "llama": dict(
        position="rope",
        norm="rmsnorm",
        norm_position="pre",
        final_norm=True,
        gated_mlp=True,
        attention_scale=True,
    ),
    "bert": dict(
        position="learned",
        norm="layernorm",
        norm_position="post",
        final_norm=False,
        gated_mlp=False,
        use_bias=True,
        attention_scale=True,
    ),
    "t5": dict(
        position="relative",
        norm="rmsnorm",
        norm_position="pre",
        final_norm=True,
        use_bias=False,
        attention_scale=False,
    ),
}


def _gpt2_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    _plain_heads(cfg, arch)
    return {
        "model_type": "gpt2",
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
        "n_positions": cfg.max_position_embeddings,
        "n_ctx": cfg.max_position_embeddings,
        "activation_function": _HF_ACTIVATION[cfg.activation],
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": cfg.attention_scale,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": cfg.dropout_rate,
        "embd_pdrop": cfg.dropout_rate,
        "attn_pdrop": cfg.attention_dropout_rate,
        "initializer_range": cfg.initializer_range,
        **_labels_to_hf(cfg),
    }


def _llama_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": _HF_ACTIVATION[cfg.activation],
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        # 4.x reads the top-level rope_theta, 5.x rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling_out(cfg),
        "rope_parameters": {
            "rope_theta": cfg.rope_theta,
            "rope_type": "default",
            **(_rope_scaling_out(cfg) or {}),
        },
        "attention_bias": cfg.use_bias,
        "mlp_bias": cfg.use_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.attention_dropout_rate,
        "initializer_range": cfg.initializer_range,
        **_labels_to_hf(cfg),
    }


def _bert_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    _plain_heads(cfg, arch)
    if cfg.type_vocab_size < 1:
        raise UnsupportedConfigError(f"{arch} needs type_vocab_size >= 1.")
    out = {
        "model_type": "bert",
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": _HF_ACTIVATION[cfg.activation],
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "initializer_range": cfg.initializer_range,
    }
    return {**out, **_labels_to_hf(cfg)}


def _labels_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`id2label` / `label2id` of a classifier (they set transformers' num_labels)."""
    if not cfg.num_labels:
        return {}
    labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
    return {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}


def _t5_feed_forward_proj(cfg: ModelConfig) -> str:
    """T5's `feed_forward_proj`: the activation's HF name, with a "gated-" prefix if gated."""
    act = _HF_ACTIVATION[cfg.activation]
    if not cfg.gated_mlp:
        return act
    if cfg.activation == "gelu":
        raise UnsupportedConfigError(
            "T5's feed_forward_proj 'gated-gelu' means the tanh GELU; a gated exact "
            "GELU has no transformers name."
        )
    return "gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}"


def _t5_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    if cfg.num_kv_heads != cfg.num_heads:
        raise UnsupportedConfigError(f"{arch} has no grouped-query attention (num_kv_heads).")
    proj = _t5_feed_forward_proj(cfg)
    # A tied head without scaling is written untied (lm_head = a copy of the embedding):
    # 4.x cannot say "tied, unscaled", and the copy reads the same in 4.x and 5.x.
    tied_scaled = cfg.tie_embeddings and cfg.scale_tied_logits
    return {
        "model_type": "t5",
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_num_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": proj,
        "is_encoder_decoder": True,
        "tie_word_embeddings": tied_scaled,
        "scale_decoder_outputs": tied_scaled,
        "dropout_rate": cfg.dropout_rate,
        "initializer_factor": cfg.initializer_range,
    }


# model_type -> the family's fields, the mirror of the import side's `_gpt2_config` etc.
_TO_HF = {"gpt2": _gpt2_to_hf, "llama": _llama_to_hf, "bert": _bert_to_hf, "t5": _t5_to_hf}


def _special_ids(cfg: ModelConfig, arch: str, model_type: str, spec: HFSpec | None) -> dict:
    """bos/eos/pad (and T5's decoder start) ids; None keeps the family's defaults."""
    if cfg.family == "t5":
        defaults = HFSpec(arch, "t5", eos_ids=(1,), pad_id=0, decoder_start_id=0)
    else:
        defaults = HFSpec(arch, model_type, pad_id=0 if cfg.family == "bert" else None)
    spec = spec or defaults
    eos = list(spec.eos_ids)
    out = {
        "bos_token_id": spec.bos_id,
        "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
        "pad_token_id": spec.pad_id,
    }
    if cfg.family == "t5":
        start = spec.decoder_start_id
        out["decoder_start_token_id"] = start if start is not None else 0
    return out


def config_to_hf(cfg: ModelConfig, spec: HFSpec | None = None) -> dict[str, Any]:
    """A `config.json` dict that transformers 4.x and 5.x both read as `cfg`.

    Args:
      cfg: our config.
      spec: special token ids to record (bos/eos/pad/decoder start); None keeps the
        family's defaults (T5: pad 0, eos 1, decoder start 0; others none).

    Raises:
      UnsupportedConfigError: `cfg` uses a feature the transformers class lacks (named).
    """
    arch = hf_architecture(cfg)
    model_type = SUPPORTED_ARCHITECTURES[arch]
    if cfg.embedding_dim is not None or cfg.share_layers:
        raise UnsupportedConfigError(
            "ALBERT-style factorized embeddings / shared layers cannot be written as BERT."
        )
    if cfg.activation not in _HF_ACTIVATION:
        raise UnsupportedConfigError(f"activation {cfg.activation!r} has no transformers name.")
    _require(cfg, arch, **_REQUIRED[model_type])
    out = {"architectures": [arch], "vocab_size": cfg.vocab_size, **_TO_HF[model_type](cfg, arch)}
    if cfg.embed_scale:
        raise UnsupportedConfigError(f"embed_scale=True has no {arch} equivalent.")
    return {**out, **_special_ids(cfg, arch, model_type, spec)}


def t5_export_untied(cfg: ModelConfig) -> bool:
    """Whether a T5 export writes `lm_head.weight` (untied, or tied but unscaled)."""
    return cfg.family == "t5" and not (cfg.tie_embeddings and cfg.scale_tied_logits)
