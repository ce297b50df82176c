"""Trace-time checks shared by every op: clear errors naming the argument."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 128
MAX_TOPK = 64
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
IMPLEMENTATIONS = ("auto", "kernel", "reference")


def num_blocks(length: int) -> int:
    """Number of 128-key blocks covering `length` keys."""
    return -(-length // BLOCK_SIZE)


def check_rank(x: jax.Array, rank: int, name: str, layout: str) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {jnp.shape(x)}")


def check_shape(x: jax.Array, expected: Sequence[int], name: str, layout: str) -> None:
    if tuple(jnp.shape(x)) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, expected {tuple(expected)} ({layout})")


def check_float_dtypes(**arrays: jax.Array) -> jnp.dtype:
    """All arrays share one of float32/bfloat16/float16; returns it."""
    names = list(arrays)
    dtype = jnp.result_type(arrays[names[0]])
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{names[0]} has dtype {dtype}; expected one of float32, bfloat16, float16")
    for name in names[1:]:
        other = jnp.result_type(arrays[name])
        if other != dtype:
            raise TypeError(f"{name} has dtype {other} but {names[0]} has dtype {dtype}; they must match")
    return dtype


def check_head_dim(d: int, name: str) -> None:
    if d % 8 != 0 or not 8 <= d <= 256:
        raise ValueError(f"{name} has head dim {d}; supported head dims are multiples of 8 from 8 to 256")


def check_topk(topk: int) -> int:
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be an int in [1, {MAX_TOPK}], got {topk!r}")
    return int(topk)


def check_gqa(hq: int, hkv: int, q_name: str = "q", kv_name: str = "k") -> None:
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{q_name} has {hq} heads, not a multiple of the {hkv} heads of {kv_name}")


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def lengths_or_default(lengths: jax.Array | None, batch: int, maximum: int, name: str) -> jax.Array:
    """Validates `lengths` ([B] integers in [0, maximum]) or returns full lengths.

    Values are checked when they are known at trace time (not tracers)."""
    if lengths is None:
        return jnp.full((batch,), maximum, jnp.int32)
    if jnp.shape(lengths) != (batch,):
        raise ValueError(f"{name} has shape {tuple(jnp.shape(lengths))}, expected ({batch},)")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {jnp.result_type(lengths)}")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.min(initial=0) < 0 or values.max(initial=0) > maximum:
            raise ValueError(f"{name} must lie in [0, {maximum}], got {values.tolist()}")
    return jnp.asarray(lengths, jnp.int32)


def check_lengths_order(q_lengths: jax.Array, kv_lengths: jax.Array) -> None:
    """kv_lengths >= q_lengths, checked when both are known at trace time."""
    if isinstance(q_lengths, jax.core.Tracer) or isinstance(kv_lengths, jax.core.Tracer):
        return
    q, kv = np.asarray(q_lengths), np.asarray(kv_lengths)
    if np.any(kv < q):
        raise ValueError(f"kv_lengths must be >= q_lengths, got kv_lengths={kv.tolist()} q_lengths={q.tolist()}")
