"""Low-rank adaptation of a dense layer (Hu et al. 2021, "LoRA").

A frozen dense map x W gains a trainable low-rank update: y = x W + (alpha / r) x A B, with
A [in, r] and B [r, out]. B starts at zero, so the adapted layer starts as the base layer.
The dense layers here are einsums whose kernel lists its input (contracted) axes before
its output axes, e.g. 'BTD,DNH->BTNH' (kernel D N H: in D, out N H) or 'BTNH,NHD->BTD'
(in N H, out D); A holds the kernel's input axes then R, B holds R then its output axes.

Shape letters: B batch, T length, D model dim, N heads, H head dim, R the LoRA rank.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

RANK_LETTER = "R"


def lora_equations(equation: str) -> tuple[str, str]:
    """The einsums of x A and of (x A) B for a dense layer's 'x,kernel->y' equation.

    'BTD,DNH->BTNH' gives ('BTD,DR->BTR', 'BTR,RNH->BTNH').

    Raises:
      ValueError: the equation already uses R, or its kernel does not list all its input
        (contracted) letters before its output letters.
    """
    ins, out = equation.split("->")
    lhs, rhs = ins.split(",")
    if RANK_LETTER in equation:
        raise ValueError(f"LoRA needs the letter {RANK_LETTER!r} free in {equation!r}.")
    contract = [c for c in rhs if c in lhs and c not in out]
    n_in = len(contract)
    if not contract or list(rhs[:n_in]) != contract or any(c not in out for c in rhs[n_in:]):
        raise ValueError(
            f"LoRA needs a kernel laid out [inputs..., outputs...]; {equation!r} is not."
        )
    hidden = "".join(c for c in lhs if c not in contract) + RANK_LETTER
    return (
        f"{lhs},{rhs[:n_in]}{RANK_LETTER}->{hidden}",
        f"{hidden},{RANK_LETTER}{rhs[n_in:]}->{out}",
    )


def lora_update(
    equation: str,
    x: Float[Array, "..."],
    lora_a: Float[Array, "... R"],
    lora_b: Float[Array, "R ..."],
    scale: float,
) -> Float[Array, "..."]:
    """The LoRA term scale * (x A) B of a dense layer with einsum `equation`.

    Args:
      equation: the dense layer's 'x,kernel->y' einsum, e.g. 'BTD,DNH->BTNH'.
      x: the layer's input (after LoRA dropout, when training), e.g. [B, T, D].
      lora_a: A [in..., R], the kernel's input axes then the rank, e.g. [D, R].
      lora_b: B [R, out...], the rank then the kernel's output axes, e.g. [R, N, H].
      scale: alpha / r (the PEFT convention).

    Returns:
      The update, shaped like the layer's output, e.g. [B, T, N, H].
    """
    a_eq, b_eq = lora_equations(equation)
    h = jnp.einsum(a_eq, x, lora_a.astype(x.dtype))  # [B, T, R]
    return jnp.einsum(b_eq, h, lora_b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
