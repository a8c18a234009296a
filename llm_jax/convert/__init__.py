"""Hugging Face interop: GPT-2, LLaMA, BERT and T5 checkpoints and tokenizers, both ways.

    model = lj.convert.load_hf("hf_dir")             # config.json + model.safetensors
    tok = lj.convert.load_hf_tokenizer("hf_dir")     # tokenizer.json or spiece/tokenizer.model
    lj.convert.save_hf(model, "out", tokenizer=tok)  # transformers' from_pretrained reads it
    lj.convert.save_checkpoint(model, "ckpt", tokenizer=tok)
    model = lj.convert.load_checkpoint("ckpt")       # also a training run's checkpoints

Only NumPy and safetensors (and `tokenizers` for tokenizer.json) are needed: no torch, no
pickle, no network. `llm-jax convert` is the command line.
"""

from llm_jax.convert.checkpoint import (
    RestoredModel,
    load_checkpoint,
    restore_model,
    save_checkpoint,
)
from llm_jax.convert.hf import (
    hf_spec,
    load_hf,
    load_hf_params,
    model_from_params,
    params_of,
    read_hf_config,
    save_hf,
)
from llm_jax.convert.hf_config import (
    SUPPORTED_ARCHITECTURES,
    HFSpec,
    UnsupportedConfigError,
    config_from_hf,
    config_to_hf,
)
from llm_jax.convert.hf_weights import HFCheckpointError, params_from_hf, params_to_hf
from llm_jax.convert.safetensors_io import read_hf_weights, write_safetensors
from llm_jax.convert.tokenizer import (
    HFTokenizer,
    load_hf_tokenizer,
    save_hf_tokenizer,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFCheckpointError",
    "HFSpec",
    "HFTokenizer",
    "RestoredModel",
    "UnsupportedConfigError",
    "config_from_hf",
    "config_to_hf",
    "hf_spec",
    "load_checkpoint",
    "load_hf",
    "load_hf_params",
    "load_hf_tokenizer",
    "model_from_params",
    "params_from_hf",
    "params_of",
    "params_to_hf",
    "read_hf_config",
    "read_hf_weights",
    "restore_model",
    "save_checkpoint",
    "save_hf",
    "save_hf_tokenizer",
    "write_safetensors",
]
