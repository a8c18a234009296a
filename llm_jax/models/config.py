"""`ModelConfig`: one frozen dataclass for the GPT, BERT and T5 families, with named presets.

A config is plain data: it holds every architectural choice, validates itself on
construction (a bad value raises ValueError naming the field and the allowed values) and
resolves its optional sizes on construction (`head_dim`, `num_kv_heads`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from llm_jax.config import Config, at_least, in_interval, one_of

FAMILIES = ("gpt", "bert", "t5")
POSITIONS = ("learned", "rope", "sinusoidal", "relative")
ROPE_TYPES = ("default", "llama3")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# See llm_jax.models.attention_impl; "auto" is xla on CPU, cudnn on GPU, pallas on TPU.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
DTYPES = ("float32", "bfloat16", "float16")
# The dense layers of a block that LoRA can adapt (wi_gate only in gated MLPs), and the
# name that stands for all of them.
LORA_LAYERS = ("q", "k", "v", "o", "wi", "wi_gate", "wo")
LORA_ALL = "all_linear"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Config):
    """Architecture of a GPT (decoder-only), BERT (encoder) or T5 (encoder–decoder) model.

    Shape letters used in the field docs: V vocab, D d_model, F d_ff, N num_heads,
    K num_kv_heads, H head_dim, L num_layers.
    """

    section: ClassVar[str] = "model"
    extra_keys: ClassVar[tuple[str, ...]] = ("preset",)  # from_dict starts from that preset

    family: str
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    # Given as None (or left out), the next three are resolved on construction, so that
    # each is always concrete: `cfg.head_dim` is H.
    num_kv_heads: int | None = None  # K; None means K = N (multi-head attention).
    head_dim: int | None = None  # H; None means D // N.
    num_decoder_layers: int | None = None  # T5 only; None means num_layers.
    max_position_embeddings: int = 1024  # rows of a learned/sinusoidal table.

    position: str = "learned"
    rope_theta: float = 10_000.0
    # RoPE frequency rescaling: "default" (none) or "llama3" (LLaMA 3.1/3.2, see
    # ops.llama3_rope_frequencies); the four fields below are read only for "llama3".
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    relative_num_buckets: int = 32
    relative_max_distance: int = 128

    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # "pre" (GPT-2, LLaMA, T5) or "post" (BERT, Transformer).
    final_norm: bool = True  # a norm after the last block (pre-LN stacks need one).
    activation: str = "gelu_tanh"
    gated_mlp: bool = False  # SwiGLU / GeGLU: act(x W_gate) * (x W_up).
    use_bias: bool = True  # biases on dense layers and norms.
    attention_scale: bool = True  # multiply q k^T by 1/sqrt(H); T5 folds it into init.

    tie_embeddings: bool = True  # output projection = input embedding transposed.
    scale_tied_logits: bool = False  # T5: logits = (h * D^-0.5) E^T when tied.
    embed_scale: bool = False  # Transformer: embeddings * sqrt(D).
    embedding_dim: int | None = None  # ALBERT factorized embeddings E; None means D.
    share_layers: bool = False  # ALBERT: one block's parameters used by all layers.
    type_vocab_size: int = 0  # BERT token types (segments A/B); 0 disables.
    use_pooler: bool = False  # BERT pooler (dense + tanh on the first token).
    use_nsp: bool = False  # BERT next-sentence (or ALBERT sentence-order) head.
    use_mlm_head: bool = False  # BERT masked-LM head (transform + norm + tied decoder).
    # Sequence-classification head [D, C]: BERT on the pooled output, GPT on the last real
    # token's hidden state; 0 disables (T5 classifies text-to-text instead).
    num_labels: int = 0
    # Prompt tuning (Lester et al. 2021): P learned soft-prompt vectors fed through
    # inputs_embeds ahead of the input (`llm_jax.finetune.prompt`); 0 means none.
    prompt_length: int = 0

    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    initializer_range: float = 0.02
    scan_layers: bool = False  # lax.scan over the stacked layers (else a Python loop).
    remat_policy: str = "none"
    attention_impl: str = "auto"  # auto | xla | cudnn | pallas (models.attention_impl).
    dtype: str = "float32"  # compute dtype; parameters stay in param_dtype.
    param_dtype: str = "float32"

    # LoRA (Hu et al. 2021) on the blocks' dense layers: y = x W + (alpha / r) x A B.
    lora_rank: int = 0  # r; 0 disables LoRA (no extra parameters).
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # dropout on the input of x A B, in training only.
    # Layer names among LORA_LAYERS (q, k, v, o: attention; wi, wi_gate, wo: MLP), or
    # "all_linear" for every one the model has.
    lora_targets: tuple[str, ...] = ("q", "v")

    # Weight-only quantization (`llm_jax.compress.quantize`): 0 keeps float weights; 8 or 4
    # stores the dense kernels and the token embedding as int8 / packed int4 with scales in
    # param_dtype, one per output channel and group of `quant_group_size` inputs (0: the
    # whole input is one group, i.e. per-channel).
    quant_bits: int = 0
    quant_group_size: int = 0
    # 8: the token embedding (GPT's tied output head too) int8 per channel whatever
    # quant_bits is (int4 on it costs the most quality); 0: quantized like the kernels.
    quant_embed_bits: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str | list):  # a single name, or a YAML list
            names = (
                (self.lora_targets,) if isinstance(self.lora_targets, str) else self.lora_targets
            )
            object.__setattr__(self, "lora_targets", tuple(names))
        self._fill_derived()
        self.validate()

    def derived_defaults(self) -> dict[str, int | None]:
        """What None means for the optional sizes, given the other fields (None: undefined,
        left for `validate` to report)."""
        n, d = self.num_heads, self.d_model
        sizes_ok = all(isinstance(v, int) and v > 0 for v in (n, d))
        return {
            "num_kv_heads": n,
            "head_dim": d // n if sizes_ok and d % n == 0 else None,
            "num_decoder_layers": self.num_layers,
        }

    # Derived quantities -------------------------------------------------------------------

    @property
    def rope_scaling(self) -> tuple[tuple[str, float], ...] | None:
        """Keyword arguments of `ops.llama3_rope_frequencies` (hashable), or None."""
        if self.rope_type != "llama3":
            return None
        return (
            ("factor", self.rope_factor),
            ("low_freq_factor", self.rope_low_freq_factor),
            ("high_freq_factor", self.rope_high_freq_factor),
            ("original_max_position", self.rope_original_max_position),
        )

    @property
    def lora_layer_names(self) -> tuple[str, ...]:
        """The dense layer names of this model's blocks that LoRA can adapt."""
        return tuple(n for n in LORA_LAYERS if n != "wi_gate" or self.gated_mlp)

    @property
    def lora_layers(self) -> tuple[str, ...]:
        """The layer names LoRA adapts, resolved ("all_linear" expanded); () without LoRA."""
        if not self.lora_rank:
            return ()
        if LORA_ALL in self.lora_targets:
            return self.lora_layer_names
        return tuple(n for n in self.lora_layer_names if n in self.lora_targets)

    @property
    def lora_scale(self) -> float:
        """alpha / r, the factor of the LoRA update (0 without LoRA)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def embed_dim(self) -> int:
        """E, the width of the token embedding table (ALBERT factorizes it)."""
        return self.d_model if self.embedding_dim is None else self.embedding_dim

    # Validation ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the bad field, its value and what would be valid."""
        self._check_choices()
        self._check_sizes()
        self._check_rope()
        self._check_heads()
        self._check_positions()
        self._check_rates()
        self._check_family_options()
        self._check_prompt()
        self._check_lora()
        self._check_quant()

    def _check_choices(self) -> None:
        one_of(self, "family", FAMILIES)
        one_of(self, "position", POSITIONS)
        one_of(self, "norm", NORMS)
        one_of(self, "rope_type", ROPE_TYPES)
        one_of(self, "norm_position", NORM_POSITIONS)
        one_of(self, "activation", ACTIVATIONS)
        one_of(self, "remat_policy", REMAT_POLICIES)
        one_of(self, "attention_impl", ATTENTION_IMPLS)
        one_of(self, "dtype", DTYPES)
        one_of(self, "param_dtype", DTYPES)

    def _check_sizes(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "d_ff",
            "num_kv_heads",
            "head_dim",
            "num_decoder_layers",
            "max_position_embeddings",
            "embedding_dim",
            "rope_original_max_position",
        ):
            at_least(self, name, 1)

    def _check_rope(self) -> None:
        """The llama3 rescaling fields, read only with rope_type='llama3'."""
        if self.rope_type == "default":
            return
        if self.position != "rope":
            raise ValueError(
                f"ModelConfig.rope_type={self.rope_type!r} rescales RoPE; it needs "
                f"position='rope' (got {self.position!r}), or set rope_type='default'."
            )
        at_least(self, "rope_factor", 1)
        if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(
                "ModelConfig: llama3 RoPE needs 0 < rope_low_freq_factor < "
                f"rope_high_freq_factor; got {self.rope_low_freq_factor} and "
                f"{self.rope_high_freq_factor}."
            )

    def _check_heads(self) -> None:
        """N, K and H must split D and each other evenly."""
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} does not divide d_model="
                f"{self.d_model}; choose num_heads among the divisors of d_model, or set "
                f"head_dim explicitly."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_kv_heads={self.num_kv_heads} does not divide num_heads="
                f"{self.num_heads}; choose num_kv_heads among the divisors of num_heads."
            )

    def _check_positions(self) -> None:
        """Each position scheme's width constraint, and which families implement it."""
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig: RoPE needs an even head_dim; got {self.head_dim}.")
        if self.position == "sinusoidal" and self.embed_dim % 2:
            raise ValueError(
                f"ModelConfig: sinusoidal positions need an even d_model; got {self.embed_dim}."
            )
        if self.position == "relative" and self.family != "t5":
            raise ValueError(
                "ModelConfig.position='relative' (T5 buckets) is only implemented for "
                "family='t5'; use 'learned' or 'rope' for GPT and 'learned' for BERT."
            )
        if self.family == "t5" and self.position not in ("relative", "sinusoidal"):
            raise ValueError(
                f"ModelConfig.position={self.position!r} is not supported for family='t5'; "
                "use 'relative' (T5) or 'sinusoidal' (the original Transformer)."
            )
        if self.family == "bert" and self.position != "learned":
            raise ValueError("ModelConfig.position must be 'learned' for family='bert'.")

    def _check_rates(self) -> None:
        for name in ("dropout_rate", "attention_dropout_rate"):
            in_interval(self, name, 0, 1, high_open=True)
        at_least(self, "norm_eps", 0, strict=True)

    def _check_family_options(self) -> None:
        """BERT/ALBERT-only heads and sharing, and what each head reads."""
        at_least(self, "num_labels", 0)
        if self.family != "bert" and (
            self.use_pooler or self.use_nsp or self.use_mlm_head or self.type_vocab_size
        ):
            raise ValueError(
                "ModelConfig: use_pooler / use_nsp / use_mlm_head / type_vocab_size are BERT "
                "options; set family='bert' or turn them off."
            )
        if (self.use_nsp or self.num_labels) and self.family == "bert" and not self.use_pooler:
            raise ValueError(
                "ModelConfig: the NSP and classification heads read the pooled output; set "
                "use_pooler=True."
            )
        if self.num_labels and self.family == "t5":
            raise ValueError(
                "ModelConfig.num_labels: T5 classifies text-to-text (the label word is the "
                "target; data objective='seq2seq' with format='fasttext'); set num_labels=0."
            )
        if self.share_layers and self.family != "bert":
            raise ValueError("ModelConfig.share_layers (ALBERT) is only supported for BERT.")
        if self.embedding_dim is not None and self.family != "bert":
            raise ValueError("ModelConfig.embedding_dim (ALBERT) is only supported for BERT.")
        if self.scale_tied_logits and not self.tie_embeddings:
            raise ValueError("ModelConfig.scale_tied_logits needs tie_embeddings=True.")

    def _check_prompt(self) -> None:
        """P soft-prompt vectors take P of a bounded position table's rows."""
        at_least(self, "prompt_length", 0, note="the number of soft-prompt vectors; 0 = none")
        bounded = self.position in ("learned", "sinusoidal")
        if bounded and (self.prompt_length or 0) >= self.max_position_embeddings:
            raise ValueError(
                f"ModelConfig.prompt_length={self.prompt_length} soft-prompt vectors leave no "
                f"room for input tokens in max_position_embeddings="
                f"{self.max_position_embeddings} positions; lower finetune.prompt_length."
            )

    def _check_lora(self) -> None:
        """Rank, alpha, dropout and target names (checked even with LoRA off, so a typo
        fails when it is written, not when LoRA is turned on)."""
        at_least(self, "lora_rank", 0, note="0 disables LoRA")
        at_least(self, "lora_alpha", 0, strict=True)
        in_interval(self, "lora_dropout", 0, 1, high_open=True)
        available = [*self.lora_layer_names, LORA_ALL]
        if not self.lora_targets or not all(isinstance(n, str) for n in self.lora_targets):
            raise ValueError(
                f"{self.key('lora_targets')}={self.lora_targets!r} must be a non-empty list of "
                f"layer names among {available}."
            )
        unknown = [n for n in self.lora_targets if n not in available]
        if unknown:
            raise ValueError(
                f"{self.key('lora_targets')}: {unknown} match no dense layer of this "
                f"{self.family} model; the available names are {available}"
                + (" (wi_gate needs gated_mlp=True)" if "wi_gate" in unknown else "")
                + "."
            )

    def _check_quant(self) -> None:
        one_of(self, "quant_bits", (0, 4, 8))
        at_least(self, "quant_group_size", 0, note="0 = one scale per output channel")
        if self.quant_bits and self.lora_rank:
            raise ValueError(
                f"{self.key('quant_bits')}={self.quant_bits} with lora_rank={self.lora_rank}: "
                "LoRA on a quantized base is not supported; quantize after merging the adapters."
            )
        one_of(self, "quant_embed_bits", (0, 8))
        if self.quant_embed_bits and not self.quant_bits:
            raise ValueError(
                f"{self.key('quant_embed_bits')}={self.quant_embed_bits} needs quant_bits 8 or 4."
            )
        if self.quant_bits == 4 and self.quant_group_size % 2:
            raise ValueError(
                f"{self.key('quant_group_size')}={self.quant_group_size}: int4 packs two values "
                "per byte along the input axis, so the group size must be even (e.g. 128)."
            )

    # Construction --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; a `preset` key starts from that preset. Unknown keys fail."""
        cls.check_keys(d)
        d = dict(d)
        preset = d.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
            d = {**PRESETS[preset], **d}
        return super().from_dict(d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named published architecture, optionally with some fields overridden (unknown
        field names raise ValueError listing the valid ones)."""
        return cls.from_dict({"preset": name, **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(PRESETS)


_GPT2 = dict(
    family="gpt",
    vocab_size=50257,
    max_position_embeddings=1024,
    position="learned",
    norm="layernorm",
    norm_eps=1e-5,
    activation="gelu_tanh",
    use_bias=True,
    tie_embeddings=True,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
)
_LLAMA = dict(
    family="gpt",
    position="rope",
    norm="rmsnorm",
    activation="silu",
    gated_mlp=True,
    use_bias=False,
    tie_embeddings=False,
)
_BERT = dict(
    family="bert",
    vocab_size=30522,
    max_position_embeddings=512,
    type_vocab_size=2,
    position="learned",
    norm="layernorm",
    norm_eps=1e-12,
    norm_position="post",
    final_norm=False,
    activation="gelu",
    use_bias=True,
    use_pooler=True,
    use_nsp=True,
    use_mlm_head=True,
    tie_embeddings=True,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
)
_T5 = dict(
    family="t5",
    vocab_size=32128,
    position="relative",
    norm="rmsnorm",
    norm_eps=1e-6,
    activation="relu",
    use_bias=False,
    attention_scale=False,
    tie_embeddings=True,
    scale_tied_logits=True,
    dropout_rate=0.1,
    initializer_range=1.0,
)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": {
        **_GPT2,
        "vocab_size": 512,
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "d_ff": 256,
        "max_position_embeddings": 128,
        "dropout_rate": 0.0,
        "attention_dropout_rate": 0.0,
    },
    "gpt2-small": {**_GPT2, "d_model": 768, "num_layers": 12, "num_heads": 12, "d_ff": 3072},
    "gpt2-medium": {**_GPT2, "d_model": 1024, "num_layers": 24, "num_heads": 16, "d_ff": 4096},
    "llama-tiny": {
        **_LLAMA,
        "vocab_size": 512,
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "d_ff": 192,
        "max_position_embeddings": 256,
        "norm_eps": 1e-5,
    },
    # LLaMA-3.2-1B (tied embeddings, llama3 RoPE rescaling as in its config.json).
    "llama-1b": {
        **_LLAMA,
        "vocab_size": 128256,
        "d_model": 2048,
        "num_layers": 16,
        "num_heads": 32,
        "num_kv_heads": 8,
        "d_ff": 8192,
        "max_position_embeddings": 131072,
        "rope_theta": 500_000.0,
        "rope_type": "llama3",
        "rope_factor": 32.0,
        "rope_low_freq_factor": 1.0,
        "rope_high_freq_factor": 4.0,
        "rope_original_max_position": 8192,
        "norm_eps": 1e-5,
        "tie_embeddings": True,
    },
    "bert-tiny": {
        **_BERT,
        "vocab_size": 512,
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "d_ff": 256,
        "max_position_embeddings": 128,
        "dropout_rate": 0.0,
        "attention_dropout_rate": 0.0,
    },
    "bert-base": {**_BERT, "d_model": 768, "num_layers": 12, "num_heads": 12, "d_ff": 3072},
    "t5-tiny": {
        **_T5,
        "vocab_size": 512,
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "d_ff": 128,
        "relative_num_buckets": 16,
        "relative_max_distance": 64,
        "dropout_rate": 0.0,
    },
    "t5-small": {**_T5, "d_model": 512, "num_layers": 6, "num_heads": 8, "d_ff": 2048},
    # The original Transformer base (Vaswani et al. 2017): shared 37k BPE vocabulary.
    "transformer-base": dict(
        family="t5",
        vocab_size=37000,
        d_model=512,
        num_layers=6,
        num_heads=8,
        d_ff=2048,
        position="sinusoidal",
        max_position_embeddings=1024,
        norm="layernorm",
        norm_eps=1e-6,
        norm_position="post",
        final_norm=False,
        activation="relu",
        use_bias=True,
        attention_scale=True,
        tie_embeddings=True,
        embed_scale=True,
        dropout_rate=0.1,
        initializer_range=0.02,
    ),
}
