"""Activation functions and gated linear units (Shazeer 2020, "GLU Variants")."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def relu(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """max(x, 0)."""
    return jnp.maximum(x, 0)


def gelu(x: Float[Array, "..."], *, approximate: bool = False) -> Float[Array, "..."]:
    """GELU (Hendrycks & Gimpel 2016): x * Phi(x) exactly (BERT), or the tanh form (GPT-2).

    tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    """
    return jax.nn.gelu(x, approximate=approximate)


def gelu_tanh(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """GELU, tanh approximation (GPT-2's "gelu_new")."""
    return jax.nn.gelu(x, approximate=True)


def silu(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """SiLU / swish: x * sigmoid(x)."""
    return jax.nn.silu(x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": relu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": silu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation called `name`; ValueError listing the valid names otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}."
        ) from None


def glu(
    gate: Float[Array, "... F"], up: Float[Array, "... F"], activation: str = "silu"
) -> Float[Array, "... F"]:
    """Gated linear unit: activation(gate) * up."""
    return get_activation(activation)(gate) * up


def swiglu(gate: Float[Array, "... F"], up: Float[Array, "... F"]) -> Float[Array, "... F"]:
    """SwiGLU (LLaMA's MLP): silu(gate) * up."""
    return glu(gate, up, "silu")


def geglu(gate: Float[Array, "... F"], up: Float[Array, "... F"]) -> Float[Array, "... F"]:
    """GeGLU (T5 v1.1's gated-GELU MLP, tanh GELU as in its checkpoints): gelu(gate) * up."""
    return glu(gate, up, "gelu_tanh")
