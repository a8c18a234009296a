"""Evaluation beyond the training loss: `evaluate` (perplexity and bits per byte,
classification metrics, generation scored with BLEU / chrF / ROUGE, zero- and few-shot
multiple choice, cloze), the log-likelihood scorer under it, and word-vector benchmarks.

    result = lj.eval.evaluate(model, tokenizer, "multiple_choice", "items.jsonl", shots=5)
"""

from llm_jax.eval.api import TASKS, evaluate, read_task_data
from llm_jax.eval.data import Choice
from llm_jax.eval.loglik import Request, Score, loglikelihood, rolling_requests
from llm_jax.eval.tasks import Prompting, score_generations
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
    "TASKS",
    "Choice",
    "Prompting",
    "Request",
    "Score",
    "WordVectors",
    "analogies",
    "evaluate",
    "load_word2vec",
    "loglikelihood",
    "read_analogies",
    "read_task_data",
    "read_wordsim",
    "rolling_requests",
    "save_word2vec",
    "score_generations",
    "spearman",
    "wordsim",
]
