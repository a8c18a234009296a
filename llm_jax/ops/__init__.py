"""The math of the field as pure jnp functions: no parameters, no Flax."""

from llm_jax.ops.activations import (
    geglu,
    gelu,
    gelu_tanh,
    get_activation,
    glu,
    relu,
    silu,
    swiglu,
)
from llm_jax.ops.attention import (
    bidirectional_mask,
    big_neg,
    causal_mask,
    combine_masks,
    cross_mask,
    dot_product_attention,
    padding_mask,
    segment_mask,
)
from llm_jax.ops.dropout import dropout
from llm_jax.ops.lora import lora_equations, lora_update
from llm_jax.ops.losses import accuracy, cross_entropy, kl_divergence
from llm_jax.ops.norms import layer_norm, rms_norm, t5_layer_norm
from llm_jax.ops.positions import (
    apply_rope,
    check_positions,
    learned_positions,
    llama3_rope_frequencies,
    rope_frequencies,
    sinusoidal_positions,
    t5_relative_position_bias,
    t5_relative_position_bucket,
)
from llm_jax.ops.softmax import log_softmax, logsumexp, softmax
from llm_jax.ops.word2vec import hierarchical_softmax_loss, negative_sampling_loss

__all__ = [
    "accuracy",
    "apply_rope",
    "bidirectional_mask",
    "big_neg",
    "causal_mask",
    "check_positions",
    "combine_masks",
    "cross_entropy",
    "cross_mask",
    "dot_product_attention",
    "dropout",
    "geglu",
    "gelu",
    "gelu_tanh",
    "get_activation",
    "glu",
    "hierarchical_softmax_loss",
    "kl_divergence",
    "layer_norm",
    "learned_positions",
    "llama3_rope_frequencies",
    "log_softmax",
    "logsumexp",
    "lora_equations",
    "lora_update",
    "negative_sampling_loss",
    "padding_mask",
    "relu",
    "rms_norm",
    "rope_frequencies",
    "segment_mask",
    "silu",
    "sinusoidal_positions",
    "softmax",
    "swiglu",
    "t5_layer_norm",
    "t5_relative_position_bias",
    "t5_relative_position_bucket",
]
