"""Which parameters train: a `Partition` splits the parameter tree into a trainable part
(differentiated, given optimizer state and checkpointed) and a frozen part (neither).

A whole leaf is trainable or frozen; a stacked block leaf `.../blocks/...` [L, ...] can
also be cut on its layer axis, so `top:2` trains the slice [L-2:L] of every stacked
weight and freezes [0:L-2], with no optimizer state or gradient for the frozen layers:

    part = partition_for(cfg, finetune, params, new_paths)
    trainable, frozen = part.split(params)       # nested dict, flat dict
    params = part.combine(trainable, frozen)     # inside the jitted step

`split` and `combine` are pure and jit-able (slices and one concatenate per cut leaf).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp

from llm_jax.convert.hf_weights import flatten_tree, unflatten_tree
from llm_jax.finetune.config import FinetuneConfig
from llm_jax.models.config import ModelConfig

# A leaf's part: True (trains), False (frozen) or (a, b): layers a..b-1 of its L axis train.
Part = bool | tuple[int, int]

STACKS = ("layers", "encoder", "decoder")  # the block stacks of GPT/BERT and of T5
EMBEDDINGS = ("embed", "pos_embed", "type_embed", "embed_norm", "embed_proj")
# Output heads: what `head` trains (with every new parameter).
HEADS = ("classifier", "lm_head", "mlm_transform", "mlm_norm", "mlm_bias", "nsp_head")
# What sits above the top block of a stack: trained with `top:K` (and with `bottom:K`,
# whose "+ head" means the output side too).
ABOVE = (*HEADS, "pooler", "final_norm", "encoder_norm", "decoder_norm")
T5_SIDES = {
    "encoder": ("encoder", "encoder_norm", "encoder_rel_bias"),
    "decoder": ("decoder", "decoder_norm", "decoder_rel_bias", "lm_head"),
}
ADAPTER_LEAVES = {"lora": ("lora_a", "lora_b"), "prompt_tuning": ("prompt",)}


def _top(path: str) -> str:
    return path.split("/")[0]


def _in_stack(path: str) -> bool:
    parts = path.split("/")
    return len(parts) > 1 and parts[0] in STACKS and parts[1] == "blocks"


@dataclasses.dataclass(frozen=True)
class Partition:
    """The part of every parameter path (flat, '/'-joined); see the module docstring."""

    parts: Mapping[str, Part]
    layers: Mapping[str, int] = dataclasses.field(default_factory=dict)  # L of cut leaves

    @property
    def is_everything(self) -> bool:
        return all(v is True for v in self.parts.values())

    def split(
        self, params: Mapping[str, Any], *, cut: Callable[[Any, int, int], Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(trainable nested dict, frozen flat dict); cut leaves leave their frozen layers
        in the frozen dict as `path:below` [a, ...] and `path:above` [L-b, ...].

        `cut(leaf, a, b)` takes layers a..b-1 of a leaf (default `leaf[a:b]`); pass
        `lambda axes, a, b: axes` to split a tree of logical axis names alongside.
        """
        cut = cut or (lambda x, a, b: x[a:b])
        flat = flatten_tree(params)
        self._check_paths(flat)
        trainable, frozen = {}, {}
        for path, x in flat.items():
            part = self.parts[path]
            if part is True:
                trainable[path] = x
            elif part is False:
                frozen[path] = x
            else:
                a, b = part
                n = self.num_layers(path, x)
                trainable[path] = cut(x, a, b)
                if a > 0:
                    frozen[f"{path}:below"] = cut(x, 0, a)
                if b < n:
                    frozen[f"{path}:above"] = cut(x, b, n)
        return unflatten_tree(trainable), frozen

    def num_layers(self, path: str, leaf: Any) -> int:
        return self.layers[path] if isinstance(leaf, tuple) else leaf.shape[0]

    def combine(self, trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
        """The whole parameter tree from the two parts of `split`."""
        flat_t = flatten_tree(trainable)
        out = {}
        for path, part in self.parts.items():
            if part is True:
                out[path] = flat_t[path]
            elif part is False:
                out[path] = frozen[path]
            else:
                pieces = [frozen.get(f"{path}:below"), flat_t[path], frozen.get(f"{path}:above")]
                out[path] = jnp.concatenate([p for p in pieces if p is not None], axis=0)
        return unflatten_tree(out)

    def trainable_paths(self) -> list[str]:
        return [p for p, v in self.parts.items() if v is not False]

    def _check_paths(self, flat: Mapping[str, Any]) -> None:
        if set(flat) != set(self.parts):
            missing = sorted(set(self.parts) - set(flat))
            extra = sorted(set(flat) - set(self.parts))
            raise ValueError(
                f"the parameters do not match the partition: missing {missing[:5]}, "
                f"unexpected {extra[:5]}."
            )


def _layer_slice(where: str, k: int, num_layers: int) -> tuple[int, int]:
    return (num_layers - k, num_layers) if where == "top" else (0, k)


def _check_layer_range(cfg: ModelConfig, where: str, k: int) -> None:
    if cfg.share_layers:
        raise ValueError(
            f"finetune.trainable={where}:{k} cuts the layer stack, but this model shares one "
            "block across its layers (ALBERT); use trainable=all, head or no_embeddings."
        )
    sizes = [cfg.num_layers] + ([cfg.num_decoder_layers] if cfg.family == "t5" else [])
    if k > min(sizes):
        raise ValueError(
            f"finetune.trainable={where}:{k} asks for {k} layers but the model has "
            f"{' and '.join(map(str, sizes))}; use K <= {min(sizes)} (or trainable=all)."
        )


def _base_part(path: str, leaf_shape: tuple[int, ...], ft: FinetuneConfig) -> Part:
    """The part of a parameter that the base already has, by `finetune.trainable`."""
    trainable = ft.trainable
    if trainable == "auto":
        trainable = "all" if ft.method == "full" else "none"
    top = _top(path)
    if trainable == "all":
        return True
    if trainable == "no_embeddings":
        return top not in EMBEDDINGS
    if trainable in T5_SIDES:
        return top in T5_SIDES[trainable]
    if ft.layer_range is not None:
        where, k = ft.layer_range
        if _in_stack(path):
            return _layer_slice(where, k, leaf_shape[0])
        return top in ABOVE
    if trainable == "head":  # new heads; a base's own classifier is retrained too
        return top == "classifier"
    return False  # "none": adapters only


def partition_for(
    cfg: ModelConfig,
    ft: FinetuneConfig,
    shapes: Mapping[str, Any],
    new_paths: Iterable[str] = (),
) -> Partition:
    """The partition of a fine-tuning run.

    Args:
      cfg: the fine-tuned model's config.
      ft: the `finetune` section.
      shapes: the model's parameter tree (arrays or ShapeDtypeStructs).
      new_paths: parameters the base does not have (always trainable).

    Raises:
      ValueError: `trainable` does not fit the model (encoder/decoder on a non-T5, a
        `top:K` beyond the layer count or on shared layers), or nothing would train.
    """
    if ft.trainable in T5_SIDES and cfg.family != "t5":
        raise ValueError(
            f"finetune.trainable={ft.trainable} freezes one stack of an encoder-decoder; this "
            f"is a {cfg.family} model: use all, head, top:K, bottom:K or no_embeddings."
        )
    if ft.layer_range is not None:
        _check_layer_range(cfg, *ft.layer_range)
    new, adapters = set(new_paths), ADAPTER_LEAVES.get(ft.method, ())
    parts: dict[str, Part] = {}
    layers: dict[str, int] = {}
    for path, leaf in flatten_tree(shapes).items():
        if path in new or path.split("/")[-1] in adapters:
            parts[path] = True
        else:
            parts[path] = _base_part(path, tuple(leaf.shape), ft)
        if isinstance(parts[path], tuple):
            layers[path] = leaf.shape[0]
    if not any(v is not False for v in parts.values()):
        raise ValueError(
            f"finetune.method={ft.method}, trainable={ft.trainable} leaves nothing to train; "
            "add a head (model.num_labels) or choose another trainable setting."
        )
    return Partition(parts, layers)
