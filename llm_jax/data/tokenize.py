"""The run's tokenizer and its tokenized corpus.

tok = build_tokenizer(cfg)                        # load cfg.tokenizer_path, or train + save
corpus = tokenize_corpus(cfg, tok, cfg.paths)     # read the way cfg.objective needs, cached
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llm_jax.data import corpus as corpus_lib
from llm_jax.data.config import DataConfig
from llm_jax.data.objectives import objective_spec
from llm_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def train_tokenizer_from(config: DataConfig, what: str = "DataConfig.paths") -> Tokenizer:
    """Train a tokenizer on `config.paths` with the config's tokenizer settings, saved to
    `config.tokenizer_path` when one is given.

    Running text trains on its files; a table (TSV / fastText) on the text cells its
    objective reads (`ObjectiveSpec.tokenizer_texts`), never on references or label names.

    Args:
        what: how to name `config.paths` in errors (the CLI passes "--input").
    """
    if config.format == "text":
        source = {"inputs": corpus_lib.list_files(config.paths, config.file_pattern, what)}
    else:
        source = {"texts": objective_spec(config.objective).tokenizer_texts(config)}
    return train_tokenizer(
        **source,
        model_type=config.tokenizer_type,
        vocab_size=config.vocab_size,
        character_coverage=config.character_coverage,
        byte_fallback=config.byte_fallback,
        num_sentinels=config.num_sentinels,
        max_sentences=config.tokenizer_max_sentences,
        out_dir=config.tokenizer_path,
    )


TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


def build_tokenizer(config: DataConfig) -> Tokenizer:
    """The run's tokenizer: loaded from `config.tokenizer_path` if one is saved there (its
    own settings then win over the config's), else trained on `config.paths` with the
    config's tokenizer settings and saved to `tokenizer_path` when given, so the next run
    and the checkpoint reuse it. A folder may hold any tokenizer `load_hf_tokenizer` reads
    (ours, a Hugging Face `tokenizer.json`, a SentencePiece model). For multi-host runs,
    train it once beforehand (`llm-jax tokenizer train`) and point every host at it."""
    path = config.tokenizer_path
    if path and Path(path).is_file():
        return load_tokenizer(path, num_sentinels=config.num_sentinels)
    if path and any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        # The one loader of tokenizer folders: ours, Hugging Face tokenizer.json or
        # SentencePiece (imported lazily: convert depends on this package).
        from llm_jax.convert.tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(path)
    return train_tokenizer_from(config)


def tokenize_corpus(
    config: DataConfig,
    tokenizer: Tokenizer,
    paths: Sequence[str],
    what: str = "DataConfig.paths",
) -> corpus_lib.TokenizedCorpus:
    """Read and tokenize the corpus at `paths` with `config.objective`'s reader, cached.

    The fields are the reader's: "docs" (clm, mlm, span_corruption); "sents" + array
    "groups" (mlm with NSP/SOP); "source", "target" (seq2seq); "text_a" [+ "text_b"] +
    array "labels" (classification); "examples" + array "prompt_lengths" (instruct).
    """
    files = corpus_lib.list_files(paths, config.file_pattern, what)
    params, build = objective_spec(config.objective).read(config, tokenizer, files, what)
    return corpus_lib.cached_tokenize(
        files, tokenizer, params, build, config.cache_dir, config.use_cache
    )
