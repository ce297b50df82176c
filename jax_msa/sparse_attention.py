"""Block-sparse MSA attention (spec §3.4), forward and backward.

Primitives:
  jax_msa_sparse_attention_fwd(q, k, v, ids, q_lengths, kv_lengths; scale) -> out, lse
  jax_msa_sparse_attention_bwd(q, k, v, ids, out, lse, dout, dlse, q_lengths, kv_lengths; scale,
      deterministic) -> dq, dk, dv
joined by a custom_vjp; `ids` and the lengths carry no gradient. On CUDA the
backward lowers to the hidden jax_msa_sparse_attention_bwd_cuda (dq, dk, dv and
four workspaces as results; see _bwd_cuda_abstract).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.core import ShapedArray

from jax_msa import _ffi
from jax_msa import _validation as checks
from jax_msa import reference
from jax_msa._attention_common import (backward_abstract, check_attention_inputs, forward_abstract,
                                       kv_outer_workspaces, reference_vjp)
from jax_msa._primitives import cuda_only, define_primitive


def _reference_forward(q, k, v, ids, q_lengths, kv_lengths, *, scale, schedule=None):
    return reference.sparse_attention(q, k, v, ids, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                      scale=float(scale), return_lse=True)


def _reference_backward(q, k, v, ids, out, lse, dout, dlse, q_lengths, kv_lengths, *, scale,
                        deterministic=False):
    fn = lambda q, k, v: _reference_forward(q, k, v, ids, q_lengths, kv_lengths, scale=scale)
    return reference_vjp(fn, q, k, v, out, lse, dout, dlse)


def _cuda_kernel_takes(q, k, v, ids, *rest, implementation, **params) -> bool:
    """Whether the SM90 kernels serve these inputs (cuda::sparse_attention_args_valid)."""
    group = q.shape[2] // k.shape[2]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[3] == 128
            and group <= 64 and 1 <= ids.shape[3] <= 64 and 0 < k.shape[1] < 2**31 - 256
            and q.shape[0] * k.shape[2] <= 65535)


# The forward on CUDA has two schedules (cuda_kernels.h), hidden primitives
# bound only inside the lowering of _fwd_p:
#   "query": query-outer tiles walk the union of their tokens' blocks: fast
#            when neighbouring tokens share their blocks (window-like ids);
#   "block": KV-outer, each selected block once for all rows that chose it,
#            per-block partials merged by lse (workspaces as extra results):
#            its cost does not depend on the sharing.
_fwd_query_p = define_primitive("sparse_attention_fwd_query", abstract_eval=forward_abstract,
                                reference=cuda_only("jax_msa_sparse_attention_fwd_query"),
                                ffi_attributes=("scale",))


def _fwd_by_block_abstract(q, k, v, ids, *rest, scale):
    b, sq, hq, d = q.shape
    index, partial = _ffi.sparse_fwd_by_block_workspace(b, sq, k.shape[1], hq, k.shape[2], d, ids.shape[3])
    return [*forward_abstract(q, k, v), ShapedArray((index,), jnp.int32), ShapedArray((partial,), jnp.uint8)]


_fwd_by_block_p = define_primitive("sparse_attention_fwd_by_block", abstract_eval=_fwd_by_block_abstract,
                                   reference=cuda_only("jax_msa_sparse_attention_fwd_by_block"),
                                   ffi_attributes=("scale",))
# "auto": both schedules enqueued, the device picks one from the ids (a cost
# estimate over the query-outer tiles; cuda_kernels.h). The by-block
# workspaces; the last 4 ints of `index` hold the two cost sums.
_fwd_auto_p = define_primitive("sparse_attention_fwd_auto", abstract_eval=_fwd_by_block_abstract,
                               reference=cuda_only("jax_msa_sparse_attention_fwd_auto"),
                               ffi_attributes=("scale",))
_FWD_ON_CUDA = {"query": _fwd_query_p, "block": _fwd_by_block_p, "auto": _fwd_auto_p}


def _fwd_on_cuda(*args, scale, schedule, implementation):
    if _ffi.portable_family_serves():  # its only forward is the query-outer one
        schedule = "query"
    return _FWD_ON_CUDA[schedule].bind(*args, scale=scale, implementation=implementation)[:2]


SCHEDULES = ("auto", "query", "block")

_fwd_p = define_primitive("sparse_attention_fwd", abstract_eval=forward_abstract,
                          reference=_reference_forward, ffi_attributes=("scale",),
                          sharding="bqhd,bkgd,bkgd,bqgt,b,b->bqhd,bqh",
                          kernel_takes={"cuda": _cuda_kernel_takes},
                          kernel_lowering={"cuda": _fwd_on_cuda}
                          if _ffi.has_kernel("jax_msa_sparse_attention_fwd_query", "cuda") else None,
                          portable_cuda_targets=("jax_msa_sparse_attention_fwd_query",))
# The backward on CUDA: one call that runs prepare (row terms, block index)
# and the KV-outer dK/dV kernel, which also computes dQ (float32 atomic sums
# into the dq_accum workspace, [B, Sq, Hq, D]) unless the device picks the
# query-outer dQ kernel from the ids (the index workspace ends with the cost
# sums), or always with `deterministic` (dq_accum then has 0 elements; the
# portable family: its dQ and dK / dV kernels, always deterministic). Its
# four workspaces are extra (discarded) results so that the handler allocates
# nothing. A hidden primitive, bound only inside the lowering of _bwd_p.
def _bwd_cuda_abstract(q, k, v, ids, *rest, scale, deterministic):
    b, sq, hq, d = q.shape
    delta, index, partial, dq_accum = _ffi.sparse_bwd_workspace(b, sq, k.shape[1], hq, k.shape[2], d, ids.shape[3])
    return [*backward_abstract(q, k, v, ids, *rest),
            *kv_outer_workspaces(delta, index, partial, 0 if deterministic else dq_accum)]


_bwd_cuda_p = define_primitive("sparse_attention_bwd_cuda", abstract_eval=_bwd_cuda_abstract,
                               reference=cuda_only("jax_msa_sparse_attention_bwd_cuda"),
                               ffi_attributes=("scale", "deterministic"))


def _bwd_on_cuda(*args, scale, deterministic, implementation):
    # The portable family's backward is always deterministic: no dq_accum workspace.
    deterministic = bool(deterministic) or _ffi.portable_family_serves()
    return _bwd_cuda_p.bind(*args, scale=scale, deterministic=deterministic,
                            implementation=implementation)[:3]


_bwd_p = define_primitive("sparse_attention_bwd", abstract_eval=backward_abstract,
                          reference=_reference_backward, ffi_attributes=("scale",),
                          sharding="bqhd,bkgd,bkgd,bqgt,bqhd,bqh,bqhd,bqh,b,b->bqhd,bkgd,bkgd",
                          kernel_takes={"cuda": _cuda_kernel_takes},
                          kernel_lowering={"cuda": _bwd_on_cuda}
                          if _ffi.has_kernel("jax_msa_sparse_attention_bwd_cuda", "cuda") else None,
                          portable_cuda_targets=("jax_msa_sparse_attention_bwd_cuda",))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _sparse_attention(q, k, v, ids, q_lengths, kv_lengths, scale, implementation, schedule, deterministic):
    out, lse = _fwd_p.bind(q, k, v, ids, q_lengths, kv_lengths, scale=scale, schedule=schedule,
                           implementation=implementation)
    return out, lse


def _sparse_attention_fwd(q, k, v, ids, q_lengths, kv_lengths, scale, implementation, schedule, deterministic):
    out, lse = _sparse_attention(q, k, v, ids, q_lengths, kv_lengths, scale, implementation, schedule,
                                 deterministic)
    return (out, lse), (q, k, v, ids, q_lengths, kv_lengths, out, lse)


def _sparse_attention_bwd(scale, implementation, schedule, deterministic, residuals, cotangents):
    q, k, v, ids, q_lengths, kv_lengths, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _bwd_p.bind(q, k, v, ids, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32),
                             q_lengths, kv_lengths, scale=scale, deterministic=deterministic,
                             implementation=implementation)
    return dq, dk, dv, None, None, None


_sparse_attention.defvjp(_sparse_attention_fwd, _sparse_attention_bwd)


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ids: jax.Array,
    *,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str = "auto",
    schedule: str = "auto",
    deterministic: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention over the selected 128-key blocks of each query (spec §3.4).

    Args:
      q: queries [B, Sq, Hq, D] (float32, bfloat16 or float16).
      k, v: keys and values [B, Sk, Hkv, D], Hq a multiple of Hkv.
      ids: selected block ids [B, Sq, Hkv, topk] int32, shared by the query
        heads of each KV group; -1 and ids outside [0, ceil(kv_length/128))
        are skipped (never read). Causal within the selected blocks.
      q_lengths, kv_lengths: valid lengths [B] (default Sq, Sk), bottom-right aligned.
      scale: default D**-0.5.
      return_lse: also return lse [B, Sq, Hq] float32 (-inf for empty rows).
      implementation: "auto" | "kernel" | "reference".
      schedule: how the CUDA forward walks the selection: "query" (tiles of
        neighbouring tokens over the union of their blocks; best when they
        share blocks), "block" (each selected block once for every row that
        chose it, partials merged by lse; cost independent of the sharing), or
        "auto" (the device picks one per call from the ids, with a cost
        estimate: on an H100 at T = 128K "query" is 2.7x faster on window ids,
        both are even on clustered ids and "block" is 1.7x faster on indexer
        ids, see benchmarks/RESULTS.md). Same results up to rounding; ignored
        elsewhere.
      deterministic: make the CUDA backward bitwise reproducible (on one
        device): dq always from a separate query-outer pass. By default the
        device picks per call from the ids: that pass where neighbouring
        tokens share their blocks (window-like ids), float32 atomic sums
        inside the KV-outer dK/dV pass elsewhere (2x faster on indexer ids).
        Ignored off CUDA.
    Returns:
      out [B, Sq, Hq, D] in q's dtype (zeros for padded rows), and lse if asked.
    Differentiable in q, k, v.
    """
    checks.check_implementation(implementation)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    q_lengths, kv_lengths, scale = check_attention_inputs(q, k, v, q_lengths, kv_lengths, scale)
    b, sq, _, _ = q.shape
    checks.check_rank(ids, 4, "ids", "[B, Sq, Hkv, topk]")
    checks.check_shape(ids, (b, sq, k.shape[2], ids.shape[3]), "ids", "[B, Sq, Hkv, topk]")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"ids must be an integer array, got dtype {jnp.result_type(ids)}")
    checks.check_topk(ids.shape[3])
    ids = jnp.asarray(ids, jnp.int32)
    if implementation == "reference":
        return reference.sparse_attention(q, k, v, ids, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=scale,
                                          return_lse=return_lse)
    out, lse = _sparse_attention(q, k, v, ids, q_lengths, kv_lengths, np.float32(scale), implementation,
                                 schedule, bool(deterministic))
    return (out, lse) if return_lse else out
