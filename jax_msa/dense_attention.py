"""Dense flash attention (spec §3.6), forward and backward.

Primitives:
  jax_msa_dot_product_attention_fwd(q, k, v, q_lengths, kv_lengths; scale, causal) -> out, lse
  jax_msa_dot_product_attention_bwd(q, k, v, out, lse, dout, dlse, q_lengths, kv_lengths;
      scale, causal) -> dq, dk, dv
joined by a custom_vjp. On CUDA the forward runs the SM90 kernel where
cuda::dense_attention_args_valid holds (bfloat16/float16, D 128 or 64), else the
reference; the backward lowers to the hidden jax_msa_dot_product_attention_bwd_cuda
(dq, dk, dv and four workspaces as results; see _bwd_cuda_abstract) where
cuda::dense_attention_bwd_args_valid holds (bfloat16/float16, D 128, Hq / Hkv
<= 64), else to the reference (which recomputes from q, k, v).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_msa import _ffi
from jax_msa import _validation as checks
from jax_msa import reference
from jax_msa._attention_common import (backward_abstract, check_attention_inputs, forward_abstract,
                                       kv_outer_workspaces, reference_vjp)
from jax_msa._primitives import cuda_only, define_primitive


def _reference_forward(q, k, v, q_lengths, kv_lengths, *, scale, causal):
    return reference.dot_product_attention(q, k, v, causal=causal, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                           scale=float(scale), return_lse=True)


def _reference_backward(q, k, v, out, lse, dout, dlse, q_lengths, kv_lengths, *, scale, causal):
    fn = lambda q, k, v: _reference_forward(q, k, v, q_lengths, kv_lengths, scale=scale, causal=causal)
    return reference_vjp(fn, q, k, v, out, lse, dout, dlse)


def _cuda_kernel_takes(q, k, v, *rest, implementation, **params) -> bool:
    """Whether the CUDA forward serves these inputs (cuda::dense_attention_args_valid; the
    portable family's also asks for G = Hq / Hkv <= 128)."""
    b, sq, hq, d = q.shape
    return (q.dtype in (jnp.bfloat16, jnp.float16) and d in (64, 128) and 0 < k.shape[1] < 2**31 - 256
            and -(-sq // 128) * b * hq < 2**31 and (hq // k.shape[2] <= 128 or not _ffi.portable_family_serves()))


_fwd_p = define_primitive("dot_product_attention_fwd", abstract_eval=forward_abstract,
                          reference=_reference_forward, ffi_attributes=("scale", "causal"),
                          sharding="bqhd,bkgd,bkgd,b,b->bqhd,bqh",
                          kernel_takes={"cuda": _cuda_kernel_takes})


def _cuda_bwd_takes(q, k, v, *rest, implementation, **params) -> bool:
    """Whether the CUDA backward (either family) serves these inputs (cuda::dense_attention_bwd_args_valid)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and d == 128 and hq // hkv <= 64
            and 0 < sk < 2**31 - 256 and sq < 2**31 - 1 and b * hkv * -(-sk // 128) < 2**31)


# The backward on CUDA: delta, then dK / dV per key block with dQ summed in
# float32 (TMA reduce-adds into dq_accum) and its conversion, in one call
# whose workspaces are extra (discarded) results, so that the handler
# allocates nothing (the KV-outer backward's four; the index and partial ones
# are empty here). The portable family writes dQ directly: without
# `with_dq_accum` that workspace has 0 elements. A hidden primitive, bound
# only inside the lowering of _bwd_p.
def _bwd_cuda_abstract(q, k, v, *rest, scale, causal, with_dq_accum):
    b, sq, hq, d = q.shape
    delta, index, partial, dq_accum = _ffi.dense_bwd_workspace(b, sq, k.shape[1], hq, k.shape[2], d)
    return [*backward_abstract(q, k, v),
            *kv_outer_workspaces(delta, index, partial, dq_accum if with_dq_accum else 0)]


_bwd_cuda_p = define_primitive("dot_product_attention_bwd_cuda", abstract_eval=_bwd_cuda_abstract,
                               reference=cuda_only("jax_msa_dot_product_attention_bwd_cuda"),
                               ffi_attributes=("scale", "causal", "with_dq_accum"))


def _bwd_on_cuda(*args, scale, causal, implementation):
    return _bwd_cuda_p.bind(*args, scale=scale, causal=causal,
                            with_dq_accum=not _ffi.portable_family_serves(),
                            implementation=implementation)[:3]


_bwd_p = define_primitive("dot_product_attention_bwd", abstract_eval=backward_abstract,
                          reference=_reference_backward, ffi_attributes=("scale", "causal"),
                          sharding="bqhd,bkgd,bkgd,bqhd,bqh,bqhd,bqh,b,b->bqhd,bkgd,bkgd",
                          kernel_takes={"cuda": _cuda_bwd_takes},
                          kernel_lowering={"cuda": _bwd_on_cuda}
                          if _ffi.has_kernel("jax_msa_dot_product_attention_bwd_cuda", "cuda") else None,
                          portable_cuda_targets=("jax_msa_dot_product_attention_bwd_cuda",))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_lengths, kv_lengths, scale, causal, implementation):
    out, lse = _fwd_p.bind(q, k, v, q_lengths, kv_lengths, scale=scale, causal=causal,
                           implementation=implementation)
    return out, lse


def _attention_fwd(q, k, v, q_lengths, kv_lengths, scale, causal, implementation):
    out, lse = _attention(q, k, v, q_lengths, kv_lengths, scale, causal, implementation)
    return (out, lse), (q, k, v, q_lengths, kv_lengths, out, lse)


def _attention_bwd(scale, causal, implementation, residuals, cotangents):
    q, k, v, q_lengths, kv_lengths, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _bwd_p.bind(q, k, v, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32), q_lengths,
                             kv_lengths, scale=scale, causal=causal, implementation=implementation)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Dense attention with GQA, lengths and bottom-right causal alignment (spec §3.6).

    Args:
      q: queries [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D], Hq a multiple of Hkv.
      causal: query i (at position kv_length - q_length + i) sees keys j <= position.
      q_lengths, kv_lengths: valid lengths [B] (default Sq, Sk).
      scale: default D**-0.5.
      return_lse: also return lse [B, Sq, Hq] float32.
      implementation: "auto" | "kernel" | "reference".
    Returns:
      out [B, Sq, Hq, D] in q's dtype (zeros for padded rows), and lse if asked.
    Differentiable in q, k, v.
    """
    checks.check_implementation(implementation)
    q_lengths, kv_lengths, scale = check_attention_inputs(q, k, v, q_lengths, kv_lengths, scale)
    if implementation == "reference":
        return reference.dot_product_attention(q, k, v, causal=causal, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                               scale=scale, return_lse=return_lse)
    out, lse = _attention(q, k, v, q_lengths, kv_lengths, np.float32(scale), bool(causal), implementation)
    return (out, lse) if return_lse else out
