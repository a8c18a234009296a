"""Initialisation schemes: the standard deviations of the normal initialisers.

`init_scheme` is the one place that picks a scheme from the model family; layers take an
`InitScheme` and never look at the family.
"""

from __future__ import annotations

import dataclasses

from llm_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class InitScheme:
    """Standard deviations of N(0, std^2) initialisers.

    Attributes:
      dense: embeddings, heads and other dense layers outside the blocks.
      q, kv, o: the attention query, key/value and output projections.
      mlp_in, mlp_out: the MLP input (and gate) and output projections.
    """

    dense: float
    q: float
    kv: float
    o: float
    mlp_in: float
    mlp_out: float


def init_scheme(cfg: ModelConfig) -> InitScheme:
    """The scheme of `cfg`'s family, scaled by `cfg.initializer_range` (r).

    T5 (relative positions): Mesh-TF fan-in scaling, with 1/sqrt(H) folded into q.
    GPT: residual projections (o, mlp_out) scaled by 1/sqrt(2L) (Radford et al. 2019).
    BERT and the original Transformer: N(0, r^2) everywhere.
    """
    r, d, n, h, f = cfg.initializer_range, cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
    if cfg.family == "t5" and cfg.position == "relative":
        return InitScheme(
            dense=r,
            q=r * (d * h) ** -0.5,
            kv=r * d**-0.5,
            o=r * (n * h) ** -0.5,
            mlp_in=r * d**-0.5,
            mlp_out=r * f**-0.5,
        )
    out = r / (2 * cfg.num_layers) ** 0.5 if cfg.family == "gpt" else r
    return InitScheme(dense=r, q=r, kv=r, o=out, mlp_in=r, mlp_out=out)
