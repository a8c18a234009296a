"""Decoding strategies: small frozen dataclasses that say *how* the next token is chosen.

A strategy is plain, hashable data. The decoding engine is compiled once per strategy
value (it is a static argument of the jitted loop), so two calls with equal strategies
share one compiled program.

- `Greedy()`: the argmax token at every step.
- `Sample(temperature, top_k, top_p)`: ancestral sampling from softmax(logits / temperature)
  restricted to the `top_k` most likely tokens and then to the smallest set whose
  probability reaches `top_p` (Holtzman et al. 2020). `temperature=0` means greedy.
- `Beam(num_beams, length_penalty, early_stopping, num_return_sequences)`: beam search
  scored as Hugging Face does: sum of the generated tokens' log-probs divided by
  (number of generated tokens) ** length_penalty.
- `Speculative(draft, k, sampling)`: a small draft model proposes k tokens, the model
  verifies them in one call (see `llm_jax.sample.speculative`); the output is that of
  `sampling` (Greedy or Sample) on the model alone: token for token for greedy, in
  distribution for sampling. The draft's parameters are not part of the compiled program's
  key: `generate` passes the draft decoder as a traced argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Pick the most likely token at every step (ties go to the lowest token id)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Sample the next token from the filtered, temperature-scaled distribution.

    The filters run in the Hugging Face order: temperature, then top-k, then top-p over
    the renormalised top-k distribution.

    Attributes:
      temperature: divides the logits; 0 means greedy, 1 the model's own distribution.
      top_k: keep only the k most likely tokens; 0 turns the filter off.
      top_p: keep the smallest set of most likely tokens whose total probability is at
        least top_p (always at least one token); 1.0 turns the filter off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(
                f"Sample(temperature={self.temperature}): temperature must be >= 0 "
                "(0 means greedy, 1 is the model's distribution)."
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(
                f"Sample(top_k={self.top_k!r}): top_k must be an int >= 0 (0 turns it off)."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"Sample(top_p={self.top_p}): top_p must be in (0, 1]; use 1.0 to turn "
                "nucleus filtering off."
            )

    @property
    def is_greedy(self) -> bool:
        """Temperature 0 is greedy by definition (the engine runs `Greedy()` instead)."""
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class Beam:
    """Beam search with Hugging Face scoring and stopping rules.

    Attributes:
      num_beams: live hypotheses kept per prompt (2 * num_beams candidates per step).
      length_penalty: exponent of the length normaliser; score = sum(log p) / n ** lp.
        > 0 favours longer sequences, < 0 shorter ones, 0 gives the raw sum.
      early_stopping: True stops a prompt as soon as num_beams hypotheses are finished;
        False stops when the best live beam, scored at the current length, cannot beat
        the worst finished one (HF's heuristic); "never" scores the live beam at the
        maximum length when length_penalty > 0 (the exact bound).
      num_return_sequences: how many of the finished hypotheses to return, best first.
    """

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"Beam(num_beams={self.num_beams!r}): num_beams must be an int >= 1.")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"Beam(early_stopping={self.early_stopping!r}): use True, False or 'never'."
            )
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise ValueError(
                f"Beam(num_return_sequences={self.num_return_sequences!r}): must be an int >= 1."
            )
        if self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"Beam(num_return_sequences={self.num_return_sequences}) exceeds "
                f"num_beams={self.num_beams}; raise num_beams or lower num_return_sequences."
            )


@dataclasses.dataclass(frozen=True)
class Speculative:
    """Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

    Attributes:
      draft: the draft: a `Decoder`, a GPT / T5 model, or a checkpoint directory (loaded
        with `llm_jax.convert.load.load_for_inference`). Same vocabulary as the model.
        Compared by identity (it holds parameters), and never part of a compiled program's
        static key.
      k: draft tokens proposed per round (each round emits 1 to k + 1 tokens per row).
      sampling: how tokens are chosen: `Greedy()` or `Sample(...)`; `Sample(temperature=0)`
        is stored as `Greedy()`.
    """

    draft: Any = dataclasses.field(compare=False)
    k: int = 4
    sampling: Greedy | Sample = Greedy()

    def __post_init__(self) -> None:
        if self.draft is None:
            raise ValueError("Speculative(draft=None): pass the draft model, decoder or directory.")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"Speculative(k={self.k!r}): k must be an int >= 1.")
        if not isinstance(self.sampling, (Greedy, Sample)):
            raise ValueError(
                f"Speculative(sampling={self.sampling!r}): use Greedy() or Sample(...); beam "
                "search does not speculate."
            )
        if isinstance(self.sampling, Sample) and self.sampling.is_greedy:
            object.__setattr__(self, "sampling", Greedy())


Strategy = Greedy | Sample | Beam | Speculative
