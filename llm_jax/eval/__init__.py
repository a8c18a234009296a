"""Evaluation of trained models that is not a training loss: word-vector benchmarks."""

from llm_jax.eval.word_vectors import (
    WordVectors,
    analogies,
    load_word2vec,
    read_analogies,
    read_wordsim,
    save_word2vec,
    spearman,
    wordsim,
)

__all__ = [
    "WordVectors",
    "analogies",
    "load_word2vec",
    "read_analogies",
    "read_wordsim",
    "save_word2vec",
    "spearman",
    "wordsim",
]
