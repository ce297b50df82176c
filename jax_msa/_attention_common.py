"""Pieces shared by sparse and dense attention: input checks and the VJP glue."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.core import ShapedArray

from jax_msa import _validation as checks

ATTENTION_LAYOUT = "q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]"


def check_attention_inputs(q, k, v, q_lengths, kv_lengths, scale):
    """Validates q/k/v and lengths; returns (q_lengths, kv_lengths, scale)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_rank(x, 4, name, ATTENTION_LAYOUT)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    checks.check_shape(k, (b, sk, hkv, d), "k", ATTENTION_LAYOUT)
    checks.check_shape(v, (b, sk, hkv, d), "v", ATTENTION_LAYOUT)
    checks.check_float_dtypes(q=q, k=k, v=v)
    checks.check_head_dim(d, "q")
    checks.check_gqa(hq, hkv)
    q_lengths = checks.lengths_or_default(q_lengths, b, sq, "q_lengths")
    kv_lengths = checks.lengths_or_default(kv_lengths, b, sk, "kv_lengths")
    checks.check_lengths_order(q_lengths, kv_lengths)
    return q_lengths, kv_lengths, checks.resolve_scale(scale, d)


def forward_abstract(q, k, v, *rest, **params):
    """(out like q, lse [B, Sq, Hq] float32)."""
    return [ShapedArray(q.shape, q.dtype), ShapedArray(q.shape[:3], jnp.float32)]


def backward_abstract(q, k, v, *rest, **params):
    """(dq like q, dk like k, dv like v)."""
    return [ShapedArray(q.shape, q.dtype), ShapedArray(k.shape, k.dtype), ShapedArray(v.shape, v.dtype)]


def kv_outer_workspaces(delta: int, index: int, partial: int, dq_accum: int) -> list[ShapedArray]:
    """The workspaces of a CUDA KV-outer backward, sizes in elements: float32
    delta, int32 index, float32 partial and dq_accum."""
    return [ShapedArray((delta,), jnp.float32), ShapedArray((index,), jnp.int32),
            ShapedArray((partial,), jnp.float32), ShapedArray((dq_accum,), jnp.float32)]


def reference_vjp(reference_fn, q, k, v, out, lse, dout, dlse):
    """Gradients of reference_fn(q, k, v) -> (out, lse): the fallback backward."""
    del out, lse
    _, pullback = jax.vjp(reference_fn, q, k, v)
    return list(pullback((dout, dlse)))
