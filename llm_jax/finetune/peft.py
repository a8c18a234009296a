"""PEFT LoRA adapter folders <-> the LoRA factors of our models.

    save_peft_adapter(cfg, params, "out")     # adapter_config.json + adapter_model.safetensors
    cfg, params = load_peft_adapter(cfg, params, "out")

The folder is what `peft` writes and `peft.PeftModel.from_pretrained(base, "out")` reads,
where `base` is the Hugging Face model that `llm_jax.convert.save_hf` exports for the
base config (the class named in its config.json: GPT2LMHeadModel, LlamaForCausalLM,
BertModel / BertFor..., T5ForConditionalGeneration). Keys are
`base_model.model.<module>.lora_A.weight` [R, in] and `...lora_B.weight` [out, R], with the
module paths of that class (from the conversion tables in `llm_jax.convert.hf_weights`);
our `lora_a` [in..., R] and `lora_b` [R, out...] flatten onto them in the kernels' order.

What maps: the blocks' dense layers q, k, v, o, wi, wi_gate, wo of LLaMA (q_proj ...
down_proj), BERT (query, key, value, attention.output.dense, intermediate.dense,
output.dense), T5 (q, k, v, o in self- and cross-attention, wi / wi_0 / wi_1, wo) and
GPT-2 (attn.c_proj, mlp.c_fc, mlp.c_proj, and the fused q/k/v projection `attn.c_attn`).
GPT-2 computes q, k and v with one Conv1D, so its adapter is one LoRA of rank m * r over
all three: A stacks the m adapted projections' A factors, B is block-diagonal, and
`rank_pattern` / `alpha_pattern` give it rank m * r and alpha m * alpha (same scale
alpha / r). Reading such a block adapter back restores the separate factors (the
safetensors metadata records which projections they were); a rank-r `c_attn` adapter
written by peft itself becomes q, k and v adapters sharing one A, which is the same map.

Not representable (a ValueError names it): adapters on only some layers, per-module ranks
other than the fused one, rsLoRA, DoRA, trained biases, `modules_to_save`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from llm_jax.convert.hf_weights import (
    FAMILIES,
    _export_prefix,
    flatten_tree,
    model_type_of,
    unflatten_tree,
)
from llm_jax.models.config import LORA_LAYERS, ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_FUSED_KEY = "llm_jax.fused_lora_targets"  # safetensors metadata: {module: "q,v"}


@dataclasses.dataclass(frozen=True)
class _Site:
    """One of our LoRA-able dense layers and the HF module it lives in.

    Attributes:
      ours: our layer path, e.g. "layers/blocks/self_attn/q" (params: ours + "/lora_a").
      name: our layer name (q, k, v, o, wi, wi_gate, wo).
      module: the HF module path with `{i}` for the layer, without the class prefix.
      in_dims: how many leading axes of our per-layer kernel are its inputs.
      part: (index, count) when the module computes `count` of our layers side by side
        (GPT-2's c_attn: q, k, v).
    """

    ours: str
    name: str
    module: str
    in_dims: int
    part: tuple[int, int] | None


def _sites(cfg: ModelConfig) -> list[_Site]:
    """Every LoRA-able dense layer of the model of `cfg`, from the conversion table."""
    out = []
    for link in FAMILIES[model_type_of(cfg)].links(cfg):
        layer, _, leaf = link.ours.rpartition("/")
        name = layer.rpartition("/")[2]
        if leaf == "kernel" and link.layered and "/blocks/" in link.ours and name in LORA_LAYERS:
            out.append(_Site(layer, name, link.hf.removesuffix(".weight"), link.in_dims, link.part))
    return out


def _dense_modules(cfg: ModelConfig) -> list[str]:
    """Every dense (2-D weight) module template of the HF model, adapted or not."""
    family = FAMILIES[model_type_of(cfg)]
    links = [link.hf for link in family.links(cfg) if link.kind in ("linear", "conv1d")]
    tied = [alias for alias, _ in family.aliases(cfg) if alias.endswith(".weight")]
    return sorted({k.removesuffix(".weight") for k in [*links, *tied]})


def _short_name(module: str, others: list[str]) -> str | None:
    """The shortest dotted suffix of `module` (a template) that no module of `others`
    ends with, or None when each such suffix still holds the layer index."""
    parts = module.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if "{i}" in suffix:
            return None
        if not any(o == suffix or o.endswith("." + suffix) for o in others):
            return suffix
    return None


def _target_modules(cfg: ModelConfig, modules: list[str]) -> list[str] | str:
    """PEFT's `target_modules` for exactly `modules` (templates): short module names
    (PEFT matches them as name suffixes) when they select nothing else, else a regex that
    PEFT matches against the full module names."""
    others = [m for m in _dense_modules(cfg) if m not in modules]
    names = [_short_name(m, others) for m in modules]
    if None not in names:
        return sorted(set(names))
    alternatives = "|".join(re.escape(m).replace(r"\{i\}", r"\d+") for m in modules)
    return f"(?:.*\\.)?(?:{alternatives})"


def _by_module(sites: list[_Site]) -> dict[str, list[_Site]]:
    out: dict[str, list[_Site]] = {}
    for site in sites:
        out.setdefault(site.module, []).append(site)
    return {m: sorted(group, key=lambda s: s.part or (0, 1)) for m, group in out.items()}


def _peft_factors(
    group: list[_Site], flat: dict[str, np.ndarray], i: int, r: int
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's lora_A [R', in] and lora_B [out, R'] of layer i of one HF module from our
    factors; a fused module stacks the m adapted parts: R' = m r, B block-diagonal."""
    a = [flat[s.ours + "/lora_a"][i].reshape(-1, r).T for s in group]  # m x [R, I]
    b = [flat[s.ours + "/lora_b"][i].reshape(r, -1).T for s in group]  # m x [O, R]
    part = group[0].part
    if part is None:
        return a[0], b[0]
    out = b[0].shape[0]
    fused_b = np.zeros((part[1] * out, len(group) * r), np.float32)
    for j, (site, bj) in enumerate(zip(group, b, strict=True)):
        fused_b[site.part[0] * out : (site.part[0] + 1) * out, j * r : (j + 1) * r] = bj
    return np.concatenate(a, axis=0), fused_b


def save_peft_adapter(
    cfg: ModelConfig,
    params: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the LoRA factors of a model as a PEFT adapter folder.

    Args:
      cfg: the model's config, with `lora_rank > 0`.
      params: its nested pure parameter dict (with the `lora_a` / `lora_b` leaves).
      out_dir: created if needed; `adapter_config.json` and `adapter_model.safetensors`
        are (re)written.
      base_model_name_or_path: recorded in adapter_config.json (where the base lives).

    Returns:
      The folder.

    Raises:
      ValueError: the model has no LoRA, or has a classification head (which a LoRA run
        trains beside the adapters, and which this folder would not carry).
    """
    if not cfg.lora_rank:
        raise ValueError(
            "this model has no LoRA adapters (lora_rank=0): train with finetune.method=lora, "
            "or export the whole model with --to-hf instead of --adapters-only."
        )
    if cfg.num_labels:
        raise ValueError(
            "this LoRA model has a classification head, which trains beside the adapters and "
            "which an adapter folder here would not carry (no modules_to_save): export the "
            "merged model with --to-hf instead of --adapters-only."
        )
    from llm_jax.convert.safetensors_io import write_safetensors

    r, alpha = cfg.lora_rank, cfg.lora_alpha
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_tree(params).items()}
    groups = _by_module([s for s in _sites(cfg) if s.name in cfg.lora_layers])
    prefix = PEFT_PREFIX + _export_prefix(cfg)
    tensors: dict[str, np.ndarray] = {}
    rank_pattern, alpha_pattern, fused = {}, {}, {}
    for module, group in groups.items():
        for i in range(flat[group[0].ours + "/lora_a"].shape[0]):
            a, b = _peft_factors(group, flat, i, r)
            key = prefix + module.format(i=i)
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        if group[0].part is not None:
            fused[module] = ",".join(s.name for s in group)
            if len(group) > 1:
                short = _short_name(module, [m for m in _dense_modules(cfg) if m != module])
                rank_pattern[short], alpha_pattern[short] = len(group) * r, len(group) * alpha
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / ADAPTER_WEIGHTS, metadata={_FUSED_KEY: json.dumps(fused)})
    adapter_config = _adapter_config(cfg, list(groups), rank_pattern, alpha_pattern)
    adapter_config["base_model_name_or_path"] = base_model_name_or_path
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


def _adapter_config(
    cfg: ModelConfig, modules: list[str], rank_pattern: dict, alpha_pattern: dict
) -> dict[str, Any]:
    """PEFT's `adapter_config.json` fields for our LoRA settings (plain LoRA only)."""
    return {
        "peft_type": "LORA",
        "task_type": {"gpt": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}.get(cfg.family),
        "base_model_name_or_path": None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": _target_modules(cfg, modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": model_type_of(cfg) == "gpt2",  # GPT-2's Conv1D weights are [in, out]
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """(adapter_config.json, tensors, {fused module: "q,v"}) of an adapter folder."""
    from safetensors import safe_open

    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"{str(path)!r} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} (peft's save_pretrained, or llm-jax convert --adapters-only)."
        )
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        fused = json.loads((f.metadata() or {}).get(_FUSED_KEY, "{}"))
    return config, tensors, fused


def _check_adapter_config(config: dict[str, Any], where: str) -> None:
    """ValueError naming each adapter feature our LoRA cannot represent."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; only LORA is read.")
    unsupported = {
        "use_rslora": (False, None),
        "use_dora": (False, None),
        "bias": ("none", None),
        "modules_to_save": (None, []),
        "layers_to_transform": (None, []),
    }
    bad = [f"{k}={config[k]!r}" for k, ok in unsupported.items() if config.get(k) not in ok]
    if bad:
        raise ValueError(
            f"{where} uses {', '.join(bad)}, which llm_jax's LoRA does not represent; "
            "retrain the adapter without them."
        )


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?{key}", module):
            return value
    return default


def _module_tables(cfg: ModelConfig, tensors: dict[str, np.ndarray], where: str):
    """{module template: {layer: (lora_A, lora_B)}} of the adapter's tensors, and the keys
    that match no LoRA-able module."""
    family = FAMILIES[model_type_of(cfg)]
    prefixes = sorted({family.strip, _export_prefix(cfg), ""}, key=len, reverse=True)
    templates = {
        module: re.compile(re.escape(module).replace(r"\{i\}", r"(\d+)"))
        for module in _by_module(_sites(cfg))
    }
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    unused = []
    for key, value in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        name = m and next(m[1][len(p) :] for p in prefixes if m[1].startswith(p))
        hit = name and next(
            ((t, r.fullmatch(name)) for t, r in templates.items() if r.fullmatch(name)), None
        )
        if not hit:
            unused.append(key)
            continue
        found.setdefault(hit[0], {}).setdefault(int(hit[1][1]), {})[m[2]] = value
    if unused:
        raise ValueError(
            f"{where} holds tensors that are not LoRA factors of this {cfg.family} model's "
            f"blocks: {sorted(unused)[:8]}; check that the adapter belongs to this base model."
        )
    return found


def _split_module(
    module: str,
    group: list[_Site],
    layers: list[dict[str, np.ndarray]],
    listed: list[str] | None,
    rank: tuple[int, int],
    scale_ok: bool,
    where: str,
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Our per-layer (A [I, R], B [R, O]) of each site of one HF module.

    `rank` is (the module's rank in the adapter, the adapter's r); `listed` names the
    fused parts our own export adapted (None for a module of peft's own making).
    """
    mod_rank, r = rank
    chosen = group if listed is None else [s for s in group if s.name in listed]
    stacked = group[0].part is not None and listed is not None
    want = r * len(chosen) if stacked else r
    if mod_rank != want or not scale_ok:
        raise ValueError(
            f"{where}: {module} has rank {mod_rank} (and its own alpha) where this model's "
            f"LoRA needs rank {want} at scale lora_alpha / r; per-module ranks "
            "(rank_pattern / alpha_pattern) are not representable."
        )
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for j, site in enumerate(chosen):
        cols = slice(j * r, (j + 1) * r) if stacked else slice(None)
        for tensors in layers:
            a, b = tensors["A"][cols].T, tensors["B"][:, cols]  # [I, R], [O', R]
            if site.part is not None:
                rows = b.shape[0] // site.part[1]
                b = b[site.part[0] * rows : (site.part[0] + 1) * rows]
            out.setdefault(site.ours, []).append((a, b.T))
    return out


def load_peft_adapter(
    cfg: ModelConfig, params: dict[str, Any], adapter_dir: str | os.PathLike
) -> tuple[ModelConfig, dict[str, Any]]:
    """Put a PEFT LoRA adapter folder onto a model: (config with its LoRA, parameters).

    Args:
      cfg: the base model's config (any LoRA fields it has are replaced by the adapter's).
      params: the base model's nested pure parameter dict (LoRA leaves are dropped).
      adapter_dir: a folder with adapter_config.json + adapter_model.safetensors.

    Returns:
      The config with the adapter's lora_rank, lora_alpha, lora_dropout and lora_targets,
      and the parameters with its `lora_a` / `lora_b` leaves (float32 NumPy) added.

    Raises:
      ValueError: not an adapter folder, an adapter of another model, or an adapter our
        LoRA cannot represent (named).
    """
    where = f"the adapter in {str(adapter_dir)!r}"
    config, tensors, fused = _read_adapter(Path(adapter_dir))
    _check_adapter_config(config, where)
    base_cfg = cfg.replace(lora_rank=0)
    flat = {k: v for k, v in flatten_tree(params).items() if not k.endswith(("/lora_a", "/lora_b"))}
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    groups = _by_module(_sites(base_cfg))
    factors: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for module, layers in _module_tables(base_cfg, tensors, where).items():
        num_layers = flat[groups[module][0].ours + "/kernel"].shape[0]
        if sorted(layers) != list(range(num_layers)) or any(len(t) != 2 for t in layers.values()):
            raise ValueError(
                f"{where} adapts {module} in layers {sorted(layers)} (or lacks a lora_A / "
                f"lora_B); this model's LoRA needs all {num_layers} layers."
            )
        per_layer = [layers[i] for i in range(num_layers)]
        mod_rank = per_layer[0]["A"].shape[0]
        mod_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        listed = fused[module].split(",") if module in fused else None
        scale_ok = np.isclose(mod_alpha / mod_rank, alpha / r)
        factors |= _split_module(
            module, groups[module], per_layer, listed, (mod_rank, r), scale_ok, where
        )
    return _with_factors(
        base_cfg, flat, factors, (r, alpha, config.get("lora_dropout", 0.0)), where
    )


def _with_factors(base_cfg, flat, factors, settings, where):
    """The config and nested parameters with `factors` ({layer path: per-layer (A, B)})."""
    sites = _sites(base_cfg)
    names = {s.name for s in sites if s.ours in factors}
    if not names:
        raise ValueError(f"{where} adapts none of this model's layers.")
    missing = [s.ours for s in sites if s.name in names and s.ours not in factors]
    if missing:
        raise ValueError(
            f"{where} adapts {sorted(names)} but not {missing}; this model's LoRA adapts a "
            "layer name in every block (e.g. T5's self- and cross-attention q alike)."
        )
    for site in sites:
        if site.ours not in factors:
            continue
        shape = flat[site.ours + "/kernel"].shape[1:]
        ins, outs = shape[: site.in_dims], shape[site.in_dims :]
        a = np.stack([a.reshape(*ins, -1) for a, _ in factors[site.ours]])
        b = np.stack([b.reshape(-1, *outs) for _, b in factors[site.ours]])
        flat[site.ours + "/lora_a"] = a.astype(np.float32)
        flat[site.ours + "/lora_b"] = b.astype(np.float32)
    r, alpha, dropout = settings
    cfg = base_cfg.replace(
        lora_rank=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        lora_targets=tuple(n for n in LORA_LAYERS if n in names),
    )
    return cfg, unflatten_tree(flat)
