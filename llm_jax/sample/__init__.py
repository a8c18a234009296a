"""Decoding: greedy, sampling and beam search over any model behind a small interface.

    out = lj.sample.generate(decoder, prompt_ids, max_new_tokens=64,
                             strategy=lj.sample.Sample(temperature=0.8, top_p=0.95),
                             eos_id=eos, rng=jax.random.key(0))

The engine (`loop`, `beam`) is model-independent: it drives a `Decoder`, i.e. anything with
an `info` record, `init_cache(batch_size, max_length)`, `tokens_to_logits(tokens,
positions, segment_ids, cache) -> (logits, cache)` and `take_rows(cache, rows)`; see
`llm_jax.sample.decoder` for the contract. `generate` accepts the project's GPT and T5
models directly through `llm_jax.sample.adapters` (imported on first use, so the engine
itself imports no model); `as_decoder(model)` gives the decoder once, for many calls.
"""

from llm_jax.sample.beam import BeamState, gather_beams
from llm_jax.sample.decoder import Decoder, DecoderInfo, FunctionDecoder
from llm_jax.sample.generate import (
    GenerateOutput,
    SpeculativeStream,
    as_decoder,
    batch_bucket,
    bucket_length,
    generate,
    stream,
)
from llm_jax.sample.loop import SamplingState
from llm_jax.sample.sampling import filter_logits
from llm_jax.sample.speculative import SpeculativeState
from llm_jax.sample.strategies import Beam, Greedy, Sample, Speculative

__all__ = [
    "Beam",
    "BeamState",
    "Decoder",
    "DecoderInfo",
    "FunctionDecoder",
    "GenerateOutput",
    "Greedy",
    "Sample",
    "SamplingState",
    "Speculative",
    "SpeculativeState",
    "SpeculativeStream",
    "as_decoder",
    "batch_bucket",
    "bucket_length",
    "filter_logits",
    "gather_beams",
    "generate",
    "stream",
]
