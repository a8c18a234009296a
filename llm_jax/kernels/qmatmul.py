"""A CPU kernel for weight-only quantized matmuls, through the XLA FFI.

XLA:CPU has no int8-weight matmul: given `x @ dequantize(q, s)` it writes a full float
copy of every weight before its library GEMM, on every decode step, so int8/int4 decoding
is no faster than float (issue 13 has the HLO). `qmatmul.cc` multiplies straight from the
int8 / packed int4 bytes (converted to float in registers), so a decode step reads 1 (or
0.5) byte a weight. It is compiled at first use with the system C++ compiler
(`-O3 -march=native`) into `$LLM_JAX_CACHE/kernels` (default `~/.cache/llm_jax/kernels`),
keyed by a hash of the source, the flags and the CPU, and registered as an FFI target.

`matmul(x, q, s, bits)` is the one entry point: it runs the kernel on the CPU backend for
up to `MAX_ROWS` rows of x (decoding, short prompts) and XLA's dequantize-then-dot
otherwise (prefill, training, GPU/TPU), and when no compiler is found (said once on
stderr). Derivatives go through the XLA formula, so `jax.grad` works either way; `vmap`
runs the kernel once per mapped row block.

`float_matmul(x, w)` is the same library's float32 product against an output-major weight
[O, I], for 2-16 rows: XLA:CPU reads the weights of such a product 2-3x slower than of a
one-row product, and decoding with a few rows is common (speculative verification,
batch 8, beams). The CPU decoders call it through `llm_jax.models._xla_cpu`.

Shape letters: M rows (tokens), I inputs, O outputs, G scale groups.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

from llm_jax.ops import quant as quant_ops

SOURCE = Path(__file__).with_name("qmatmul.cc")
TARGET = "llm_jax_qmatmul"
F_TARGET = "llm_jax_fmatmul"
FLAGS = ("-O3", "-march=native", "-std=c++20", "-pthread", "-shared", "-fPIC")
# Up to this many rows the kernel (one pass over the bytes) beats dequantize + GEMM; past
# it the float copy is amortised over enough rows that XLA's GEMM wins.
MAX_ROWS = 32
# The float kernel's rows: from 2 (one row is XLA's own matvec, as fast) up to this many
# (past it XLA's GEMM reuses each weight over enough rows).
F_MIN_ROWS, F_MAX_ROWS = 2, 16


def cache_dir() -> Path:
    """Where compiled kernels live: `$LLM_JAX_CACHE/kernels` or `~/.cache/llm_jax/kernels`."""
    root = os.environ.get("LLM_JAX_CACHE") or Path.home() / ".cache" / "llm_jax"
    return Path(root) / "kernels"


def _cpu_id() -> str:
    """The CPU's model and flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compile(compiler: str) -> Path:
    """The shared library of `qmatmul.cc`, compiled once per source, flags and CPU."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_id().encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"qmatmul-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Whether the kernel is compiled and registered (once per process; the reason it is
    not is printed once to stderr)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        print("qmatmul: no C++ compiler found; quantized matmuls use XLA.", file=sys.stderr)
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
    except (subprocess.CalledProcessError, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        print(f"qmatmul: kernel unavailable ({detail.strip()[:500]}); using XLA.", file=sys.stderr)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LlmJaxQMatmul), platform="cpu")
    jax.ffi.register_ffi_target(F_TARGET, jax.ffi.pycapsule(lib.LlmJaxFMatmul), platform="cpu")
    return True


def use_kernel(rows: int) -> bool:
    """Whether `matmul` runs the kernel for `rows` rows on the default backend."""
    return 0 < rows <= MAX_ROWS and jax.default_backend() == "cpu" and available()


def reference(
    x: Float[Array, "M I"], q: Int8[Array, "Ip O"], s: Float[Array, "G O"], bits: int
) -> Float[Array, "M O"]:
    """XLA's form: dequantize the kernel in x's dtype, then one dot."""
    return x @ quant_ops.dequantize(q, s, bits, x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _kernel(x, q, s, bits):
    call = jax.ffi.ffi_call(
        TARGET,
        jax.ShapeDtypeStruct((x.shape[0], q.shape[1]), jnp.float32),
        vmap_method="sequential",
    )
    return call(x, q, s, bits=bits)


@_kernel.defjvp
def _kernel_jvp(bits, primals, tangents):
    # The product is linear in x and in s; the XLA form gives the (transposable) tangent.
    tangent = jax.jvp(lambda x, q, s: reference(x, q, s, bits), primals, tangents)[1]
    return _kernel(*primals, bits), tangent


def matmul(
    x: Float[Array, "M I"], q: Int8[Array, "Ip O"], s: Float[Array, "G O"], bits: int
) -> Float[Array, "M O"]:
    """x . dequantize(q, s) (see `llm_jax.ops.quant` for the layout), in x's dtype.

    Args:
      x: [M, I] activations.
      q: int8 [I, O] (bits 8) or packed int4 [I / 2, O] (bits 4).
      s: [G, O] scales, G dividing I.
      bits: 8 or 4.
    """
    if not use_kernel(x.shape[0]):
        return reference(x, q, s, bits)
    y = _kernel(x.astype(jnp.float32), q, s.astype(jnp.float32), bits)
    return y.astype(x.dtype)


def einsum(
    equation: str, x: Array, q: Int8[Array, "Ip ..."], s: Float[Array, "G ..."], bits: int
) -> Array | None:
    """A quantized dense layer's einsum through the kernel, or None where it does not apply.

    It applies when the equation contracts x's trailing axes with the kernel's leading ones
    in the same order and keeps the rest in order (e.g. 'BTD,DNH->BTNH', 'BTNH,NHD->BTD'),
    and `use_kernel` holds for the rows (x's leading axes); the caller then dequantizes.

    Args:
      equation: 'x,kernel->y' of the float layer.
      x: the input, in the compute dtype.
      q: the stored kernel [I / pack, O...] (input axes flattened to I).
      s: scales [G, O...].
      bits: 8 or 4.
    """
    ins, out = equation.split("->")
    lhs, rhs = ins.split(",")
    n_in = sum(c in lhs and c not in out for c in rhs)
    contracted = rhs[:n_in]
    if not lhs.endswith(contracted) or out != lhs[: len(lhs) - n_in] + rhs[n_in:]:
        return None
    batch = x.shape[: x.ndim - n_in]
    rows = math.prod(batch)
    if not use_kernel(rows):
        return None
    y = matmul(x.reshape(rows, -1), q.reshape(q.shape[0], -1), s.reshape(s.shape[0], -1), bits)
    return y.reshape(*batch, *q.shape[1:])


def use_float_kernel(rows: int) -> bool:
    """Whether `float_matmul` runs the kernel for `rows` rows on the default backend."""
    return F_MIN_ROWS <= rows <= F_MAX_ROWS and jax.default_backend() == "cpu" and available()


@jax.custom_jvp
def _float_kernel(x, w):
    call = jax.ffi.ffi_call(
        F_TARGET,
        jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32),
        vmap_method="sequential",
    )
    return call(x, w)


@_float_kernel.defjvp
def _float_kernel_jvp(primals, tangents):
    tangent = jax.jvp(lambda x, w: x @ w.T, primals, tangents)[1]
    return _float_kernel(*primals), tangent


def float_matmul(x: Float[Array, "M I"], w: Float[Array, "O I"]) -> Float[Array, "M O"]:
    """x . w^T for a float32 weight stored output-major [O, I] (the CPU decoders' layout,
    `llm_jax.models._xla_cpu.to_output_major`): the kernel for `use_float_kernel` rows
    (speculative verification, batch 8, beams), XLA's dot otherwise."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32 or not use_float_kernel(x.shape[0]):
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
    return _float_kernel(x, w)
