"""Hugging Face state dicts <-> our parameter pytrees, for GPT-2, LLaMA, BERT and T5.

Each family is a table of `Link`s: one Hugging Face tensor (a key template with `{i}` for
the layer index) and the parameter it becomes in our pure parameter dict (`/`-joined path;
per-layer tensors are stacked on the leading L axis of `layers/blocks/...`,
`encoder/blocks/...`, `decoder/blocks/...`). The same table drives import and export, so
the two directions cannot drift apart.

Layouts (our kernels are einsum-shaped: q/k/v [D, N, H], o [N, H, D], MLP [D, F], [F, D]):

- `linear`: torch `nn.Linear` weight [out, in] (LLaMA, BERT, T5): ours = W^T reshaped.
- `conv1d`: GPT-2's `Conv1D` weight, already [in, out]: ours = W reshaped. GPT-2's fused
  `c_attn` [D, 3D] holds q, k, v side by side (`part`).
- `flat`: a 1-D tensor that is [N, H] for us (attention biases).
- `copy`: the same shape (embeddings, norms, T5 relative bias tables [U, N]).

Loading is strict: every parameter of the model must come from the checkpoint, every
tensor of the checkpoint must be used, known to be a buffer (attention masks, position ids,
RoPE frequencies), or a tied copy equal to the tensor it duplicates. Anything else raises
`HFCheckpointError` listing the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from llm_jax.convert.hf_config import hf_architecture, t5_export_untied
from llm_jax.models.config import ModelConfig


class HFCheckpointError(ValueError):
    """A checkpoint's tensors do not match the model its config describes."""


@dataclasses.dataclass(frozen=True)
class Link:
    """One Hugging Face tensor <-> one of our parameters (or a slice of it, see `part`).

    Attributes:
      hf: normalised key, with `{i}` for the layer index of stacked parameters.
      ours: `/`-joined path in our pure parameter dict.
      kind: "copy", "flat", "linear" or "conv1d" (see the module docstring).
      in_dims: for linear/conv1d, how many leading axes of our kernel (after L) are inputs.
      part: (index, count): ours is slice `index` of `count` equal slices of the HF
        tensor's last axis (GPT-2's fused q, k, v).
    """

    hf: str
    ours: str
    kind: str = "copy"
    in_dims: int = 1
    part: tuple[int, int] | None = None

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape for our (per-layer) shape."""
        ins, outs = math.prod(shape[: self.in_dims]), math.prod(shape[self.in_dims :])
        out = {
            "copy": shape,
            "flat": (math.prod(shape),),
            "linear": (outs, ins),
            "conv1d": (ins, outs),
        }[self.kind]
        if self.part is not None:
            out = (*out[:-1], out[-1] * self.part[1])
        return tuple(out)

    def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.part is not None:
            x = np.split(x, self.part[1], axis=-1)[self.part[0]]
        if self.kind == "linear":
            x = x.T
        return np.ascontiguousarray(x.reshape(shape))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        ins = math.prod(x.shape[: self.in_dims])
        if self.kind == "flat":
            return x.reshape(-1)
        if self.kind == "linear":
            return x.reshape(ins, -1).T
        if self.kind == "conv1d":
            return x.reshape(ins, -1)
        return x


# --- the four families ----------------------------------------------------------------------


def _norm(hf: str, ours: str, bias: bool) -> list[Link]:
    links = [Link(f"{hf}.weight", f"{ours}/scale")]
    return [*links, Link(f"{hf}.bias", f"{ours}/bias")] if bias else links


def _dense(hf: str, ours: str, kind: str, bias: bool, in_dims: int = 1, flat_bias=False):
    links = [Link(f"{hf}.weight", f"{ours}/kernel", kind, in_dims)]
    if bias:
        links.append(Link(f"{hf}.bias", f"{ours}/bias", "flat" if flat_bias else "copy"))
    return links


def _gpt2_links(cfg: ModelConfig) -> list[Link]:
    blk = "layers/blocks"
    links = [
        Link("wte.weight", "embed/embedding"),
        Link("wpe.weight", "pos_embed"),
        *_norm("h.{i}.ln_1", f"{blk}/self_attn_norm", True),
        *_dense("h.{i}.attn.c_proj", f"{blk}/self_attn/o", "conv1d", True, in_dims=2),
        *_norm("h.{i}.ln_2", f"{blk}/mlp_norm", True),
        *_dense("h.{i}.mlp.c_fc", f"{blk}/mlp/wi", "conv1d", True),
        *_dense("h.{i}.mlp.c_proj", f"{blk}/mlp/wo", "conv1d", True),
        *_norm("ln_f", "final_norm", True),
    ]
    for j, name in enumerate("qkv"):
        links.append(
            Link(
                "h.{i}.attn.c_attn.weight", f"{blk}/self_attn/{name}/kernel", "conv1d", part=(j, 3)
            )
        )
        links.append(
            Link("h.{i}.attn.c_attn.bias", f"{blk}/self_attn/{name}/bias", "flat", part=(j, 3))
        )
    return [*links, *_decoder_head_links(cfg)]


def _decoder_head_links(cfg: ModelConfig) -> list[Link]:
    """GPT-2 / LLaMA heads: the untied LM head, or a sequence classifier's `score` [C, D]
    (transformers' *ForSequenceClassification classes have no LM head, so a classifier
    fine-tuned from an untied base exports without it; `params_to_hf` warns)."""
    if cfg.num_labels:
        return [Link("score.weight", "classifier/kernel", "linear")]
    if not cfg.tie_embeddings:
        return [Link("lm_head.weight", "lm_head/kernel", "linear")]
    return []


def _llama_links(cfg: ModelConfig) -> list[Link]:
    blk, b = "layers/blocks", cfg.use_bias
    links = [
        Link("embed_tokens.weight", "embed/embedding"),
        *_norm("layers.{i}.input_layernorm", f"{blk}/self_attn_norm", False),
        *_norm("layers.{i}.post_attention_layernorm", f"{blk}/mlp_norm", False),
        *_dense("layers.{i}.self_attn.o_proj", f"{blk}/self_attn/o", "linear", b, in_dims=2),
        *_dense("layers.{i}.mlp.gate_proj", f"{blk}/mlp/wi_gate", "linear", b),
        *_dense("layers.{i}.mlp.up_proj", f"{blk}/mlp/wi", "linear", b),
        *_dense("layers.{i}.mlp.down_proj", f"{blk}/mlp/wo", "linear", b),
        *_norm("norm", "final_norm", False),
    ]
    for name in "qkv":
        links += _dense(
            f"layers.{{i}}.self_attn.{name}_proj",
            f"{blk}/self_attn/{name}",
            "linear",
            b,
            flat_bias=True,
        )
    return [*links, *_decoder_head_links(cfg)]


def _bert_links(cfg: ModelConfig) -> list[Link]:
    blk, pre = "layers/blocks", "encoder.layer.{i}"
    links = [
        Link("embeddings.word_embeddings.weight", "embed/embedding"),
        Link("embeddings.position_embeddings.weight", "pos_embed"),
        *_norm("embeddings.LayerNorm", "embed_norm", True),
        *_dense(f"{pre}.attention.output.dense", f"{blk}/self_attn/o", "linear", True, 2),
        *_norm(f"{pre}.attention.output.LayerNorm", f"{blk}/self_attn_norm", True),
        *_dense(f"{pre}.intermediate.dense", f"{blk}/mlp/wi", "linear", True),
        *_dense(f"{pre}.output.dense", f"{blk}/mlp/wo", "linear", True),
        *_norm(f"{pre}.output.LayerNorm", f"{blk}/mlp_norm", True),
    ]
    for hf_name, name in (("query", "q"), ("key", "k"), ("value", "v")):
        links += _dense(
            f"{pre}.attention.self.{hf_name}",
            f"{blk}/self_attn/{name}",
            "linear",
            True,
            flat_bias=True,
        )
    if cfg.type_vocab_size:
        links.append(Link("embeddings.token_type_embeddings.weight", "type_embed"))
    if cfg.use_pooler:
        links += _dense("pooler.dense", "pooler", "linear", True)
    if cfg.use_mlm_head:
        links += [
            *_dense("cls.predictions.transform.dense", "mlm_transform", "linear", True),
            *_norm("cls.predictions.transform.LayerNorm", "mlm_norm", True),
            Link("cls.predictions.bias", "mlm_bias"),
        ]
    if cfg.use_nsp:
        links += _dense("cls.seq_relationship", "nsp_head", "linear", True)
    if cfg.num_labels:
        links += _dense("classifier", "classifier", "linear", True)
    return links


def _t5_links(cfg: ModelConfig) -> list[Link]:
    def attention(hf: str, ours: str) -> list[Link]:
        out = [Link(f"{hf}.{n}.weight", f"{ours}/{n}/kernel", "linear") for n in "qkv"]
        return [*out, Link(f"{hf}.o.weight", f"{ours}/o/kernel", "linear", in_dims=2)]

    def mlp(hf: str, ours: str) -> list[Link]:
        out = [Link(f"{hf}.wo.weight", f"{ours}/wo/kernel", "linear")]
        if cfg.gated_mlp:  # HF: act(wi_0 x) * (wi_1 x); ours: act(wi_gate x) * (wi x)
            out.append(Link(f"{hf}.wi_0.weight", f"{ours}/wi_gate/kernel", "linear"))
            out.append(Link(f"{hf}.wi_1.weight", f"{ours}/wi/kernel", "linear"))
        else:
            out.append(Link(f"{hf}.wi.weight", f"{ours}/wi/kernel", "linear"))
        return out

    enc, dec = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
    rel = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    links = [
        Link("shared.weight", "embed/embedding"),
        Link(f"encoder.{rel}", "encoder_rel_bias"),
        Link(f"decoder.{rel}", "decoder_rel_bias"),
        *attention(f"{enc}.0.SelfAttention", "encoder/blocks/self_attn"),
        *_norm(f"{enc}.0.layer_norm", "encoder/blocks/self_attn_norm", False),
        *mlp(f"{enc}.1.DenseReluDense", "encoder/blocks/mlp"),
        *_norm(f"{enc}.1.layer_norm", "encoder/blocks/mlp_norm", False),
        *_norm("encoder.final_layer_norm", "encoder_norm", False),
        *attention(f"{dec}.0.SelfAttention", "decoder/blocks/self_attn"),
        *_norm(f"{dec}.0.layer_norm", "decoder/blocks/self_attn_norm", False),
        *attention(f"{dec}.1.EncDecAttention", "decoder/blocks/cross_attn"),
        *_norm(f"{dec}.1.layer_norm", "decoder/blocks/cross_attn_norm", False),
        *mlp(f"{dec}.2.DenseReluDense", "decoder/blocks/mlp"),
        *_norm(f"{dec}.2.layer_norm", "decoder/blocks/mlp_norm", False),
        *_norm("decoder.final_layer_norm", "decoder_norm", False),
    ]
    if not cfg.tie_embeddings:
        links.append(Link("lm_head.weight", "lm_head/kernel", "linear"))
    return links


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model type's checkpoints are laid out.

    Attributes:
      links: the tensor table of a config.
      strip: the key prefixes that `from_pretrained` accepts on the backbone's keys
        (e.g. "transformer." for GPT2LMHeadModel, absent for GPT2Model).
      heads: prefixes of keys that belong to task heads, never prefixed.
      aliases: (duplicate key, original key) pairs: tied copies that may be stored, and
        must then equal the original.
      ignored: regexes of buffers that are stored by some versions but are not weights.
    """

    links: Any
    strip: str
    heads: tuple[str, ...]
    aliases: Any
    ignored: tuple[str, ...]


def _gpt2_aliases(cfg):
    return [("lm_head.weight", "wte.weight")] if cfg.tie_embeddings else []


def _llama_aliases(cfg):
    return [("lm_head.weight", "embed_tokens.weight")] if cfg.tie_embeddings else []


def _bert_aliases(cfg):
    return [
        ("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.bias", "cls.predictions.bias"),
    ]


def _t5_aliases(cfg):
    out = [
        ("encoder.embed_tokens.weight", "shared.weight"),
        ("decoder.embed_tokens.weight", "shared.weight"),
    ]
    return [*out, ("lm_head.weight", "shared.weight")] if cfg.tie_embeddings else out


FAMILIES = {
    "gpt2": Family(
        _gpt2_links,
        "transformer.",
        ("lm_head.", "score."),
        _gpt2_aliases,
        (r"h\.\d+\.attn\.(masked_)?bias",),
    ),
    "llama": Family(
        _llama_links,
        "model.",
        ("lm_head.", "score."),
        _llama_aliases,
        (r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",),
    ),
    "bert": Family(
        _bert_links,
        "bert.",
        ("cls.", "classifier."),
        _bert_aliases,
        (r"embeddings\.position_ids", r"embeddings\.token_type_ids"),
    ),
    "t5": Family(
        _t5_links,
        "",
        ("lm_head.",),
        _t5_aliases,
        (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",),
    ),
}


def model_type_of(cfg: ModelConfig) -> str:
    """The Hugging Face model type our config is exported as."""
    if cfg.family == "gpt":
        return "gpt2" if cfg.position == "learned" else "llama"
    return cfg.family


# --- keys -----------------------------------------------------------------------------------


def normalize_keys(
    model_type: str, weights: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Strip the backbone prefix (and rename BERT's legacy LayerNorm gamma/beta).

    Returns:
      (normalised key -> tensor, normalised key -> key as stored, for error messages).

    Raises:
      HFCheckpointError: two stored keys normalise to the same name.
    """
    family = FAMILIES[model_type]
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value in weights.items():
        name = key
        if family.strip and name.startswith(family.strip):
            name = name[len(family.strip) :]
        if model_type == "bert":
            name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
            name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        if name in out:
            raise HFCheckpointError(
                f"the checkpoint stores both {origin[name]!r} and {key!r}, the same tensor "
                "with and without a prefix; keep one."
            )
        out[name], origin[name] = value, key
    return out, origin


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested parameter dict as {'a/b/c': leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_tree`."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _listing(items: list[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --- import ---------------------------------------------------------------------------------


def params_from_hf(
    cfg: ModelConfig,
    model_type: str,
    weights: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    origin: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Our pure parameter dict (float32 NumPy leaves) from normalised HF tensors.

    Args:
      cfg: the model's config (decides which links apply).
      model_type: "gpt2", "llama", "bert" or "t5".
      weights: normalised key -> tensor (see `normalize_keys`).
      shapes: our parameter paths ('/'-joined) -> shapes, from the abstract model.
      origin: normalised key -> stored key, for error messages.

    Raises:
      HFCheckpointError: missing, unexpected or mis-shaped tensors, or a stored tied copy
        that differs from its original; every problem is listed.
    """
    family = FAMILIES[model_type]
    found = _Reading(weights, origin or {k: k for k in weights})
    for link in family.links(cfg):
        found.read_link(link, shapes)
    for alias, original in family.aliases(cfg):
        found.check_alias(alias, original)
    found.raise_problems(model_type, family)
    unfilled = sorted(set(shapes) - set(found.flat))
    if unfilled:  # a table bug: never hand back a partly random model
        raise AssertionError(f"parameters not covered by the conversion table: {unfilled}")
    return unflatten_tree(found.flat)


class _Reading:
    """One `params_from_hf` pass: the converted parameters so far, and the problems to list.

    Attributes:
      weights: normalised key -> tensor; origin: normalised key -> stored key.
      flat: our '/'-joined path -> converted parameter.
      used: normalised keys that were read.
      missing: keys the table wants that the checkpoint lacks (in table order).
      misshaped: notes on tensors of the wrong shape.
      differing: notes on stored tied copies that differ from their originals.
    """

    def __init__(self, weights: Mapping[str, np.ndarray], origin: Mapping[str, str]):
        self.weights, self.origin = weights, origin
        self.flat: dict[str, np.ndarray] = {}
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshaped: list[str] = []
        self.differing: list[str] = []

    def read_link(self, link: Link, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Converts the tensors of one link (one per layer when layered) into `flat`; one
        missing or mis-shaped in any layer is recorded and the parameter left out."""
        if link.ours not in shapes:
            raise AssertionError(f"conversion table names {link.ours!r}, not in the model")
        full = tuple(shapes[link.ours])
        shape = full[1:] if link.layered else full
        layers = range(full[0]) if link.layered else [None]
        pieces = []
        for i in layers:
            key = link.hf.format(i=i) if link.layered else link.hf
            if key not in self.weights:
                if key not in self.missing:
                    self.missing.append(key)
                continue
            self.used.add(key)
            x = self.weights[key]
            want = link.hf_shape(shape)
            if tuple(x.shape) != want:
                stored = self.origin.get(key, key)
                note = f"{stored} {tuple(x.shape)} (expected {want} for {link.ours})"
                if note not in self.misshaped:
                    self.misshaped.append(note)
                continue
            pieces.append(link.to_ours(np.asarray(x, np.float32), shape))
        if len(pieces) == len(layers):
            self.flat[link.ours] = np.stack(pieces) if link.layered else pieces[0]

    def check_alias(self, alias: str, original: str) -> None:
        """A stored tied copy is used, and must equal the tensor it duplicates."""
        if alias not in self.weights:
            return
        self.used.add(alias)
        same = original in self.weights and np.array_equal(
            np.asarray(self.weights[alias], np.float32),
            np.asarray(self.weights[original], np.float32),
        )
        if not same:
            name = self.origin.get
            self.differing.append(f"{name(alias, alias)} != {name(original, original)}")

    def raise_problems(self, model_type: str, family: Family) -> None:
        """One HFCheckpointError listing every missing, unexpected, mis-shaped or differing
        key; nothing when there are none."""
        ignored = re.compile("|".join(f"(?:{p})" for p in family.ignored))
        unexpected = sorted(
            self.origin.get(k, k)
            for k in self.weights
            if k not in self.used and not ignored.fullmatch(k)
        )
        problems = []
        if self.missing:
            prefix = f" (prefix {family.strip!r} optional)" if family.strip else ""
            problems.append(f"missing keys{prefix}: {_listing(self.missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if self.misshaped:
            problems.append(f"shape mismatches: {_listing(self.misshaped)}")
        if self.differing:
            problems.append(
                f"tied copies that differ from their originals: {_listing(self.differing)}"
            )
        if problems:
            raise HFCheckpointError(
                f"the {model_type} checkpoint does not match its config.json: "
                + "; ".join(problems)
                + ". Check that config.json belongs to these weights."
            )


# --- export ---------------------------------------------------------------------------------


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The state dict transformers' `from_pretrained` expects, float32, canonical keys.

    Tied copies are not written (transformers ties them), except T5's head when it is tied
    but unscaled, which is written as an untied copy (see `hf_config.config_to_hf`).
    """
    model_type = model_type_of(cfg)
    family = FAMILIES[model_type]
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_tree(params).items()}
    out: dict[str, np.ndarray] = {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    if cfg.num_labels and "lm_head/kernel" in flat:
        warnings.warn(
            f"{hf_architecture(cfg)} has no LM head: this classifier's untied lm_head is not "
            "written (its class logits do not depend on it).",
            stacklevel=2,
        )
    for link in family.links(cfg):
        x = flat[link.ours]
        for i in range(x.shape[0]) if link.layered else [None]:
            key = link.hf.format(i=i) if link.layered else link.hf
            y = link.to_hf(x[i] if link.layered else x)
            if link.part is None:
                out[key] = y
            else:
                parts.setdefault(key, {})[link.part[0]] = y
    for key, pieces in parts.items():
        out[key] = np.concatenate([pieces[j] for j in sorted(pieces)], axis=-1)
    if t5_export_untied(cfg) and cfg.tie_embeddings:
        out["lm_head.weight"] = flat["embed/embedding"].copy()
    prefix = _export_prefix(cfg)
    return {
        (k if k.startswith(family.heads) else prefix + k): np.ascontiguousarray(v)
        for k, v in out.items()
    }


def _export_prefix(cfg: ModelConfig) -> str:
    arch = hf_architecture(cfg)
    return {
        "GPT2LMHeadModel": "transformer.",
        "GPT2ForSequenceClassification": "transformer.",
        "LlamaForCausalLM": "model.",
        "LlamaForSequenceClassification": "model.",
        "BertModel": "",
        "T5ForConditionalGeneration": "",
    }.get(arch, "bert.")
