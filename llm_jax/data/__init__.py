"""Tokenizers and the data pipeline: text on disk → packed, sharded, resumable batches.

    tok = lj.data.build_tokenizer(cfg)              # or lj.data.load_tokenizer(path)
    it = lj.data.make_iterator(cfg, tok, split="train", mesh=mesh)
    batch = next(it); state = it.get_state(); it.set_state(state)

See `iterator` for the stages, `objectives` for each objective (its batch contract and spec),
`tokenize` for the tokenizer and corpus, `splits` for train / validation.
"""

from llm_jax.data import corpus, objectives, packing
from llm_jax.data.config import DataConfig
from llm_jax.data.corpus import InvalidUTF8Warning
from llm_jax.data.iterator import DataIterator, host_slice, load_source, make_iterator
from llm_jax.data.objectives import (
    OBJECTIVES,
    ObjectiveSpec,
    clm_batch,
    example_rng,
    mlm_mask,
    random_spans_noise_mask,
    reconstruct_span_corruption,
    shift_right,
    span_corrupt,
    span_corruption_raw_length,
)
from llm_jax.data.tokenize import build_tokenizer, tokenize_corpus, train_tokenizer_from
from llm_jax.data.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from llm_jax.parallel.mesh import BATCH_AXES as DATA_AXES
from llm_jax.parallel.mesh import batch_sharding, check_batch_size

__all__ = [
    "DATA_AXES",
    "OBJECTIVES",
    "CharTokenizer",
    "DataConfig",
    "DataIterator",
    "InvalidUTF8Warning",
    "ObjectiveSpec",
    "SentencePieceTokenizer",
    "Tokenizer",
    "batch_sharding",
    "build_tokenizer",
    "check_batch_size",
    "clm_batch",
    "corpus",
    "example_rng",
    "host_slice",
    "load_source",
    "load_tokenizer",
    "make_iterator",
    "mlm_mask",
    "objectives",
    "packing",
    "random_spans_noise_mask",
    "reconstruct_span_corruption",
    "shift_right",
    "span_corrupt",
    "span_corruption_raw_length",
    "tokenize_corpus",
    "train_tokenizer",
    "train_tokenizer_from",
]
