"""The training objectives, one module each, and the registry the pipeline dispatches on.

Each module holds its objective's pure, seeded NumPy batch builders, its corpus reader, its
`Source` and its `ObjectiveSpec` (see `base`). Adding an objective is one new module, one
line in `OBJECTIVES`, and the model-facing half: one line in `llm_jax.train.losses.LOSSES`
(and a loss function there if no existing one fits).

Batch dict contracts (int32 unless noted; names shared with the models and the trainer):
    clm:   tokens, targets, weights (f32), segment_ids, positions               [B, T]
    instruct: as clm, weights 1 only on targets inside a response (and its EOS)
    mlm:   tokens (masked), targets (original), weights (f32, 1 on selected),
           segment_ids, positions, token_type_ids [B, T];
           with NSP/SOP also nsp_labels, nsp_weights (f32) [B]
    span_corruption / seq2seq: encoder_tokens, encoder_segment_ids, encoder_positions
           [B, T]; decoder_tokens, decoder_targets, decoder_weights (f32),
           decoder_segment_ids, decoder_positions [B, S]
    classification: tokens, token_type_ids, segment_ids, positions [B, T];
           labels, label_weights (f32) [B]
"""

from llm_jax.data.objectives import classification, clm, instruct, mlm, seq2seq, span
from llm_jax.data.objectives.base import (
    STREAM_MLM,
    STREAM_NOISE,
    STREAM_PAIR,
    ObjectiveSpec,
    Source,
    Split,
    example_rng,
)
from llm_jax.data.objectives.clm import clm_batch
from llm_jax.data.objectives.mlm import mlm_mask, ordinary_ids, pair_row, truncate_pair
from llm_jax.data.objectives.seq2seq import shift_right
from llm_jax.data.objectives.span import (
    noise_counts,
    random_spans_noise_mask,
    reconstruct_span_corruption,
    span_corrupt,
    span_corruption_lengths,
    span_corruption_raw_length,
)

OBJECTIVES: dict[str, ObjectiveSpec] = {
    spec.name: spec
    for spec in (
        clm.SPEC,
        mlm.SPEC,
        span.SPEC,
        seq2seq.SPEC,
        classification.SPEC,
        instruct.SPEC,
    )
}


def objective_spec(name: str) -> ObjectiveSpec:
    """The spec registered as `name`; ValueError listing the registered ones otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {list(OBJECTIVES)}.")
    return OBJECTIVES[name]


__all__ = [
    "OBJECTIVES",
    "STREAM_MLM",
    "STREAM_NOISE",
    "STREAM_PAIR",
    "ObjectiveSpec",
    "Source",
    "Split",
    "clm_batch",
    "example_rng",
    "mlm_mask",
    "noise_counts",
    "objective_spec",
    "ordinary_ids",
    "pair_row",
    "random_spans_noise_mask",
    "reconstruct_span_corruption",
    "shift_right",
    "span_corrupt",
    "span_corruption_lengths",
    "span_corruption_raw_length",
    "truncate_pair",
]
