"""One loader for inference commands (`llm-jax sample`, `llm-jax eval`): a model and its
tokenizer from one of our checkpoints or from a Hugging Face folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference.

    Attributes:
      model: the restored model (GPT, BERT or T5).
      tokenizer: its tokenizer.
      run_config: the training run's saved config ({} for a Hugging Face folder).
      what: a phrase saying what was loaded ("step 300 from runs/tiny/checkpoints/300").
      where: the folder it came from.
      hf_config: a Hugging Face folder's config.json ({} for our checkpoints).
    """

    model: Any
    tokenizer: Any
    run_config: dict[str, Any]
    what: str
    where: Path
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_checkpoint_for_inference(path: str, step: int | None = None) -> LoadedModel:
    """Our checkpoint (a run, its checkpoints/ folder, one step, or `convert --to` output);
    the tokenizer is the step's copy, else the training workdir's `tokenizer/` folder."""
    from llm_jax.convert import load_hf_tokenizer, restore_model

    restored = restore_model(path, step)
    ref = restored.ref
    tokenizer_dir = ref.tokenizer_dir()
    if tokenizer_dir is None:
        raise FileNotFoundError(
            f"checkpoint step {ref.step} in {ref.root} has no tokenizer and neither does "
            f"{ref.root.parent}; copy the run's tokenizer folder to "
            f"{ref.root.parent / 'tokenizer'}."
        )
    what = f"step {ref.step} from {ref.dir}"
    tokenizer = load_hf_tokenizer(tokenizer_dir)
    return LoadedModel(restored.model, tokenizer, restored.config, what, ref.dir)


def load_hf_for_inference(path: str) -> LoadedModel:
    """A Hugging Face model folder (config.json, safetensors, tokenizer files)."""
    from llm_jax.convert import load_hf, load_hf_tokenizer, read_hf_config

    source = Path(path).expanduser().absolute()
    if not source.is_dir():
        raise FileNotFoundError(
            f"{source} is not a folder; pass a Hugging Face model folder (config.json, "
            "model.safetensors and the tokenizer files), e.g. one saved by save_pretrained."
        )
    model = load_hf(source)
    what = f"Hugging Face model from {source}"
    return LoadedModel(
        model, load_hf_tokenizer(source), {}, what, source, hf_config=read_hf_config(source)
    )


def load_for_inference(
    checkpoint: str | None = None, hf: str | None = None, step: int | None = None
) -> LoadedModel:
    """Exactly one of `checkpoint` (with an optional `step`) and `hf`."""
    if (checkpoint is None) == (hf is None):
        raise ValueError("give exactly one of --checkpoint DIR and --hf DIR.")
    if hf is not None:
        if step is not None:
            raise ValueError("--step applies to --checkpoint, not to --hf folders.")
        return load_hf_for_inference(hf)
    return load_checkpoint_for_inference(checkpoint, step)
