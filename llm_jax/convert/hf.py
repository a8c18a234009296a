"""`load_hf` and `save_hf`: Hugging Face model folders <-> our models.

    model = lj.convert.load_hf("path/to/hf_dir")       # GPT, BERT or T5, float32 params
    lj.convert.save_hf(model, "out_dir", tokenizer=tok)  # transformers' from_pretrained reads it

A folder is `config.json` + `model.safetensors` (or a sharded
`model.safetensors.index.json`), plus tokenizer files. Nothing is downloaded, no pickle is
read and torch is not needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.checkpoint.trees import tree_mismatch
from llm_jax.convert.hf_config import (
    HFSpec,
    UnsupportedConfigError,
    architecture_of,
    config_from_hf,
    config_to_hf,
    hf_architecture,
    spec_of,
)
from llm_jax.convert.hf_weights import (
    flatten_tree,
    model_type_of,
    normalize_keys,
    params_from_hf,
    params_to_hf,
)
from llm_jax.convert.safetensors_io import WEIGHTS_NAME, read_hf_weights, write_safetensors
from llm_jax.convert.tokenizer import save_hf_tokenizer
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.models import build
from llm_jax.models.config import ModelConfig

CONFIG_NAME = "config.json"


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a Hugging Face model folder."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no {CONFIG_NAME}; pass a Hugging Face model folder "
            "(config.json + model.safetensors)."
        )
    return json.loads(file.read_text(encoding="utf-8"))


def hf_spec(path: str | os.PathLike) -> HFSpec:
    """Architecture and special ids (bos, eos, pad, decoder start) of a model folder.

    Useful for decoding: `eos_id=spec.eos_id`; T5 decoding starts from
    `spec.decoder_start_id`.
    """
    return spec_of(read_hf_config(path))


def abstract_params(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter paths ('/'-joined) -> shapes, without allocating anything."""
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in flatten_tree(params_of(model)).items()}


def params_of(model: nnx.Module) -> dict[str, Any]:
    """The model's parameters as a nested pure dict (`nnx.to_pure_dict`)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(cfg: ModelConfig, params: dict[str, Any]) -> nnx.Module:
    """Build the model of `cfg` with exactly `params` (no random initialisation runs).

    Raises:
      ValueError: the parameter tree or a shape differs from the model's (named).
    """
    abstract = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    lines = tree_mismatch(params, nnx.to_pure_dict(state), have_name="the parameters")
    if lines:
        raise ValueError(
            f"parameters do not fit the {cfg.family} model of this config: {'; '.join(lines)}."
        )
    # Floats take the config's param_dtype; a quantized model's int8 kernels stay int8.
    dtypes = jax.tree.map(lambda v: v.dtype, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params, dtypes))
    return nnx.merge(graphdef, state)


def load_hf_params(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(our config, our pure parameter dict of float32 NumPy arrays) of a model folder.

    Raises:
      FileNotFoundError: no config.json or safetensors weights.
      UnsupportedConfigError: an unsupported architecture or a config field we cannot
        honour (named).
      HFCheckpointError: missing, unexpected or mis-shaped tensors (listed).
    """
    hf = read_hf_config(path)
    _, model_type = architecture_of(hf)
    weights, origin = normalize_keys(model_type, read_hf_weights(path))
    cfg = config_from_hf(hf, weights)
    params = params_from_hf(cfg, model_type, weights, abstract_params(cfg), origin)
    return cfg, params


def load_hf(path: str | os.PathLike, **config_overrides: Any) -> nnx.Module:
    """Our model (`GPT`, `BERT` or `T5`) with the weights of a Hugging Face folder.

    Args:
      path: folder with config.json and model.safetensors (or a sharded index).
      **config_overrides: `ModelConfig` fields that do not change the weights, e.g.
        `dtype="bfloat16"` for bf16 compute, `scan_layers=True`, `dropout_rate=0.0`.

    Returns:
      GPT2LMHeadModel/GPT2Model and LlamaForCausalLM -> `GPT`; Bert* -> `BERT` with the
      heads the checkpoint has; T5ForConditionalGeneration -> `T5`. Parameters are float32.

    Raises:
      See `load_hf_params`.
    """
    cfg, params = load_hf_params(path)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    return model_from_params(cfg, params)


def save_hf(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    spec: HFSpec | None = None,
    add_bos: bool | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` (+ tokenizer files) for transformers.

    Args:
      model: a `GPT` (learned positions -> GPT2LMHeadModel, RoPE -> LlamaForCausalLM),
        `BERT` (class chosen by its heads) or T5 (relative positions). A model with LoRA
        is written merged (`llm_jax.finetune.merge_lora`), a quantized one dequantized.
      out_dir: created if needed; existing files of the same names are replaced.
      tokenizer: a `Tokenizer` or a tokenizer folder to write beside the model.
      spec: special ids to record in config.json; by default taken from `tokenizer`
        (bos/eos/pad), else the family's defaults.
      add_bos: whether the exported tokenizer puts BOS before a text, as the model saw in
        training (see `save_hf_tokenizer`).

    Returns:
      The output folder.

    Raises:
      UnsupportedConfigError: the model uses a feature the transformers class lacks.
    """
    if model.cfg.lora_rank:
        from llm_jax.finetune.lora import merge_lora  # finetune sits above convert

        model = merge_lora(model)
    if model.cfg.quant_bits:
        from llm_jax.compress.quant import dequantize  # compress sits above convert

        model = dequantize(model)
    cfg: ModelConfig = model.cfg
    if cfg.prompt_length:
        raise UnsupportedConfigError(
            f"this model is prompt-tuned (prompt_length={cfg.prompt_length}): a transformers "
            "class has no soft prompt, so the export would silently drop it. Sample or "
            "evaluate it with llm-jax, or fine-tune with finetune.method=full|lora to export."
        )
    arch = hf_architecture(cfg)
    tok = None
    if tokenizer is not None:
        from llm_jax.convert.tokenizer import load_hf_tokenizer

        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_hf_tokenizer(tokenizer)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}."
            )
    if spec is None and tok is not None:
        spec = HFSpec(
            arch,
            model_type_of(cfg),
            bos_id=tok.bos_id,
            eos_ids=() if tok.eos_id is None else (tok.eos_id,),
            pad_id=tok.pad_id if tok.pad_id is not None else (0 if cfg.family == "t5" else None),
            decoder_start_id=(tok.pad_id or 0) if cfg.family == "t5" else None,
        )
    hf_config = config_to_hf(cfg, spec)
    tensors = params_to_hf(cfg, params_of(model))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, t5=cfg.family == "t5", add_bos=add_bos)
    return out
