"""Paged inference (spec §3.7): attention and the indexer over paged caches.

Primitives:
  jax_msa_paged_attention(k_cache, v_cache, k_scale, v_scale, q, page_table, q_lengths,
      kv_lengths[, ids]; scale, out_dtype) -> out, lse          (dense without ids)
  jax_msa_paged_indexer(ki_cache, ki_scale, qi, page_table, q_lengths, kv_lengths;
      topk, scale) -> ids
The cache-side operands (caches, then their float32 scalar scales) come first
and have no batch axis; the per-request operands after them do. Inference
only: neither is differentiable. On CUDA, paged_attention runs as the hidden
jax_msa_paged_attention_cuda (kernel and split-KV combine, with a workspace
result) and paged_indexer as two kernels: paged_indexer_scores (hidden,
below) and the indexer's indexer_select.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jax_msa import _ffi
from jax_msa import _validation as checks
from jax_msa import reference
from jax_msa._primitives import cuda_only, define_primitive
from jax_msa.indexer import _indexer_select_p

CACHE_DTYPES = checks.FLOAT_DTYPES + (jnp.dtype(jnp.float8_e4m3fn),)
_KV_LAYOUT = "k_cache/v_cache [num_pages, Hkv, 128, D]"
_KI_LAYOUT = "ki_cache [num_pages, 128, Di]"
_TABLE_LAYOUT = "page_table [B, max_pages]"
_IDS_LAYOUT = "ids [B, Sq, Hkv, topk]"


def _attention_abstract(k_cache, v_cache, k_scale, v_scale, q, page_table, q_lengths, kv_lengths, *ids,
                        scale, out_dtype):
    return [ShapedArray(q.shape, out_dtype), ShapedArray(q.shape[:3], jnp.float32)]


def _attention_reference(k_cache, v_cache, k_scale, v_scale, q, page_table, q_lengths, kv_lengths, *ids,
                         scale, out_dtype):
    return reference.paged_attention(q, k_cache, v_cache, page_table, kv_lengths, ids[0] if ids else None,
                                     k_scale=k_scale, v_scale=v_scale, q_lengths=q_lengths, scale=float(scale),
                                     return_lse=True, out_dtype=out_dtype)


# paged_attention on CUDA (sm90/paged_attention.cu; where the portable family
# serves, portable/paged_attention.cu, with the same splits and workspace):
# each (request, kv head, query chunk) tile's pages may be split over several
# CTAs (`splits`, chosen from the static shapes by
# cuda::paged_attention_splits), whose float32
# partials an lse-weighted combine merges; the partials live in a workspace
# that is an extra result of the hidden primitive below, so that the FFI
# handler allocates nothing.
_E4M3 = jnp.dtype(jnp.float8_e4m3fn)


def _cuda_attention_takes(k_cache, v_cache, k_scale, v_scale, q, page_table, q_lengths, kv_lengths, *ids,
                          implementation, scale, out_dtype) -> bool:
    """Whether the CUDA kernel takes these inputs (cuda::paged_attention_supported):
    bfloat16/float16 q with D = 128 and G = Hq / Hkv <= 128, k/v caches both of
    q's dtype or both e4m3, 32-bit page numbers and key positions."""
    hkv = k_cache.shape[1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[3] == 128 and k_cache.dtype == v_cache.dtype
            and k_cache.dtype in (q.dtype, _E4M3) and hkv >= 1 and q.shape[2] // hkv <= 128
            and 1 <= k_cache.shape[0] < 2**31 and page_table.shape[1] <= (2**31 - 257) // checks.BLOCK_SIZE)


def _cuda_attention_abstract(k_cache, v_cache, k_scale, v_scale, q, *rest, scale, splits, out_dtype):
    b, nq, hq, d = q.shape
    workspace = ShapedArray((_ffi.paged_attention_workspace(b, nq, hq, d, int(splits)),), jnp.float32)
    return [*_attention_abstract(k_cache, v_cache, k_scale, v_scale, q, *rest, scale=scale, out_dtype=out_dtype),
            workspace]


_attention_cuda_p = define_primitive("paged_attention_cuda", abstract_eval=_cuda_attention_abstract,
                                     reference=cuda_only("jax_msa_paged_attention_cuda"),
                                     ffi_attributes=("scale", "splits"), shared_operands=4)


def _attention_on_cuda(k_cache, v_cache, k_scale, v_scale, q, page_table, *rest, scale, out_dtype,
                       implementation):
    b, nq, hq, _ = q.shape
    ids = rest[2:]
    splits = _ffi.paged_attention_splits(b, nq, hq, k_cache.shape[1], page_table.shape[1],
                                         ids[0].shape[3] if ids else 0)
    return _attention_cuda_p.bind(k_cache, v_cache, k_scale, v_scale, q, page_table, *rest, scale=scale,
                                  splits=np.int64(splits), out_dtype=out_dtype, implementation=implementation)[:2]


# Operands: k_cache, v_cache, k_scale, v_scale (shared by the batch), then per request.
_attention_p = define_primitive(
    "paged_attention", abstract_eval=_attention_abstract, reference=_attention_reference,
    ffi_attributes=("scale",), shared_operands=4, kernel_takes={"cuda": _cuda_attention_takes},
    kernel_lowering=({"cuda": _attention_on_cuda}
                     if _ffi.has_kernel("jax_msa_paged_attention_cuda", "cuda") else None),
    portable_cuda_targets=("jax_msa_paged_attention_cuda",))


def _indexer_abstract(ki_cache, ki_scale, qi, page_table, q_lengths, kv_lengths, *, topk, scale):
    return [ShapedArray((*qi.shape[:3], topk), jnp.int32)]


def _indexer_reference(ki_cache, ki_scale, qi, page_table, q_lengths, kv_lengths, *, topk, scale):
    return [reference.paged_indexer(qi, ki_cache, page_table, kv_lengths, topk=int(topk), ki_scale=ki_scale,
                                    q_lengths=q_lengths, scale=float(scale))]


def _scores_abstract(ki_cache, ki_scale, qi, page_table, q_lengths, kv_lengths, *, scale):
    return [ShapedArray((*qi.shape[:3], page_table.shape[1]), jnp.float32)]


def _scores_reference(ki_cache, ki_scale, qi, page_table, q_lengths, kv_lengths, *, scale):
    """Block maxima over each query's visible keys: the kernel's values on the
    pages before each query's local page, the only ones the selection reads
    (the kernel leaves the others unwritten)."""
    return [reference.paged_block_scores(qi, ki_cache, page_table, kv_lengths, ki_scale=ki_scale,
                                         q_lengths=q_lengths, scale=float(scale))]


# paged_indexer on CUDA: paged_indexer_scores -> indexer_select (with Sq = Q,
# NB = max_pages: the query positions of spec §3.7 are the indexer's), the
# block scores an XLA buffer between them. Hidden; its only kernel is CUDA's.
_scores_p = define_primitive("paged_indexer_scores", abstract_eval=_scores_abstract, reference=_scores_reference,
                             ffi_attributes=("scale",), shared_operands=2)


def _cuda_indexer_takes(ki_cache, ki_scale, qi, *rest, implementation, **params) -> bool:
    """Whether the CUDA kernels take these inputs (cuda::paged_indexer_scores_supported):
    16-bit qi with Di 64 or 128, and a cache of qi's dtype or float8_e4m3fn (an
    e4m3 cache runs the f16 MMA, which holds e4m3 exactly and bf16 qi after a
    power-of-two scaling)."""
    return (qi.dtype in (jnp.bfloat16, jnp.float16) and qi.shape[-1] in (64, 128)
            and ki_cache.dtype in (qi.dtype, jnp.float8_e4m3fn))


def _indexer_cuda(ki_cache, ki_scale, qi, page_table, q_lengths, kv_lengths, *, topk, scale, implementation):
    (scores,) = _scores_p.bind(ki_cache, ki_scale, qi, page_table, q_lengths, kv_lengths, scale=scale,
                               implementation=implementation)
    return _indexer_select_p.bind(scores, q_lengths, kv_lengths, topk=topk, implementation=implementation)


# Operands: ki_cache, ki_scale (shared by the batch), then per request.
_indexer_p = define_primitive(
    "paged_indexer", abstract_eval=_indexer_abstract, reference=_indexer_reference,
    ffi_attributes=("topk", "scale"), shared_operands=2, kernel_takes={"cuda": _cuda_indexer_takes},
    kernel_lowering=({"cuda": _indexer_cuda} if _ffi.has_kernel("jax_msa_paged_indexer_scores", "cuda") else None),
    portable_cuda_targets=("jax_msa_paged_indexer_scores", "jax_msa_indexer_select"))


def int32_indices(x: jax.Array, bound: int) -> jax.Array:
    """An integer index array as int32. Entries of a wider type outside
    [0, bound) become -1 first, so that none can wrap onto a valid index."""
    x = jnp.asarray(x)
    if x.dtype == jnp.int32:
        return x
    return jnp.where((x >= 0) & (x < bound), x, -1).astype(jnp.int32)


def check_ids(ids: jax.Array, shape: tuple[int, int, int], num_blocks: int) -> jax.Array:
    """Validates selected block ids [B, Sq, Hkv, topk] (shape: (B, Sq, Hkv));
    returns them as int32 (see int32_indices; num_blocks bounds the valid ids)."""
    checks.check_rank(ids, 4, "ids", _IDS_LAYOUT)
    checks.check_shape(ids, (*shape, ids.shape[3]), "ids", _IDS_LAYOUT)
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"ids must be an integer array, got dtype {jnp.result_type(ids)}")
    checks.check_topk(ids.shape[3])
    return int32_indices(ids, num_blocks)


def check_lengths(q_lengths, kv_lengths, batch: int, q_max: int, kv_max: int):
    """Validates q_lengths ([B] in [0, q_max], default q_max) and kv_lengths
    ([B] in [0, kv_max], default kv_max), kv >= q; returns them as int32."""
    default_q = q_lengths is None
    q_lengths = checks.lengths_or_default(q_lengths, batch, q_max, "q_lengths")
    kv_lengths = checks.lengths_or_default(kv_lengths, batch, kv_max, "kv_lengths")
    # The default q_lengths is traced under jit: compare against its value.
    checks.check_lengths_order(np.full(batch, q_max) if default_q else q_lengths, kv_lengths)
    return q_lengths, kv_lengths


def _check_cache(cache: jax.Array, expected: tuple, name: str, layout: str) -> None:
    """cache has rank len(expected) and the given dims (None: any) and a cache dtype."""
    checks.check_rank(cache, len(expected), name, layout)
    checks.check_shape(cache, tuple(s if e is None else e for s, e in zip(cache.shape, expected)), name, layout)
    dtype = jnp.result_type(cache)
    if dtype not in CACHE_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}; expected one of float32, bfloat16, float16, float8_e4m3fn")


def _scale_operand(value, name: str) -> jax.Array:
    """A per-tensor cache scale as a float32 scalar operand (default 1)."""
    if value is None:
        return jnp.ones((), jnp.float32)
    if jnp.shape(value) != ():
        raise ValueError(f"{name} must be a scalar (one scale per tensor), got shape {jnp.shape(value)}")
    return jnp.asarray(value, jnp.float32)


def _check_requests(q, page_table, q_lengths, kv_lengths, num_pages: int):
    """Validates page_table [B, max_pages] and the lengths of the requests of q
    [B, Q, ...]; returns them as int32 (page_table, q_lengths, kv_lengths)."""
    b, nq = q.shape[:2]
    checks.check_rank(page_table, 2, "page_table", _TABLE_LAYOUT)
    checks.check_shape(page_table, (b, page_table.shape[1]), "page_table", _TABLE_LAYOUT)
    if not jnp.issubdtype(jnp.result_type(page_table), jnp.integer):
        raise TypeError(f"page_table must be an integer array, got dtype {jnp.result_type(page_table)}")
    q_lengths, kv_lengths = check_lengths(q_lengths, kv_lengths, b, nq, page_table.shape[1] * checks.BLOCK_SIZE)
    return int32_indices(page_table, num_pages), q_lengths, kv_lengths


def paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    page_table: jax.Array,
    kv_lengths: jax.Array,
    ids: jax.Array | None = None,
    *,
    k_scale: float | jax.Array | None = None,
    v_scale: float | jax.Array | None = None,
    q_lengths: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out_dtype=jnp.bfloat16,
    implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of new queries over a paged KV cache: decode, MTP, chunked prefill.

    Args:
      q: queries [B, Q, Hq, D] (float32, bfloat16 or float16); query t of
        request b sits at position kv_lengths[b] - q_lengths[b] + t.
      k_cache, v_cache: pages [num_pages, Hkv, 128, D] in bfloat16 or
        float8_e4m3fn (or float32/float16); an element's value is stored * scale.
      page_table: [B, max_pages] int32, logical page -> physical page. Entries
        < 0 or >= num_pages are holes: their keys are skipped, never read.
      kv_lengths: [B] cached tokens of each request, the Q new ones included.
      ids: None for dense attention over every visible key, or the selected
        logical pages [B, Q, Hkv, topk] (e.g. from `paged_indexer`), shared by
        the query heads of each KV group; -1, ids >= ceil(kv_length / 128)
        and holes are skipped.
      k_scale, v_scale: per-tensor float32 scales of the caches (default 1);
        Python floats or traced scalars.
      q_lengths: [B] valid queries per request (default Q); padded queries
        give zeros (out) and -inf (lse).
      scale: logit scale, default D**-0.5.
      return_lse: also return lse [B, Q, Hq] float32.
      out_dtype: dtype of out: bfloat16 (the default), float32 or float16.
      implementation: "auto" | "kernel" | "reference".
    Returns:
      out [B, Q, Hq, D] in out_dtype, and lse if asked. Not differentiable.
    """
    checks.check_implementation(implementation)
    checks.check_rank(q, 4, "q", "q [B, Q, Hq, D]")
    b, nq, hq, d = q.shape
    checks.check_float_dtypes(q=q)
    checks.check_head_dim(d, "q")
    _check_cache(k_cache, (None, None, checks.BLOCK_SIZE, d), "k_cache", _KV_LAYOUT)
    _check_cache(v_cache, k_cache.shape, "v_cache", _KV_LAYOUT)
    num_pages, hkv = k_cache.shape[:2]
    checks.check_gqa(hq, hkv, "q", "k_cache")
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    page_table, q_lengths, kv_lengths = _check_requests(q, page_table, q_lengths, kv_lengths, num_pages)
    if ids is not None:
        ids = check_ids(ids, (b, nq, hkv), page_table.shape[1])
    k_scale, v_scale = _scale_operand(k_scale, "k_scale"), _scale_operand(v_scale, "v_scale")
    scale = checks.resolve_scale(scale, d)
    if implementation == "reference":
        return reference.paged_attention(q, k_cache, v_cache, page_table, kv_lengths, ids, k_scale=k_scale,
                                         v_scale=v_scale, q_lengths=q_lengths, scale=scale, return_lse=return_lse,
                                         out_dtype=out_dtype)
    operands = [k_cache, v_cache, k_scale, v_scale, q, page_table, q_lengths, kv_lengths]
    out, lse = _attention_p.bind(*operands, *([] if ids is None else [ids]), scale=np.float32(scale),
                                 out_dtype=out_dtype, implementation=implementation)
    return (out, lse) if return_lse else out


def paged_indexer(
    qi: jax.Array,
    ki_cache: jax.Array,
    page_table: jax.Array,
    kv_lengths: jax.Array,
    *,
    topk: int = 16,
    ki_scale: float | jax.Array | None = None,
    q_lengths: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """The MSA indexer over a paged index-key cache: the pages each new query attends.

    Args:
      qi: index queries [B, Q, Hi, Di] (float32, bfloat16 or float16),
        positioned as the queries of `paged_attention`.
      ki_cache: index-key pages [num_pages, 128, Di] in bfloat16 or
        float8_e4m3fn (or float32/float16); value = stored * ki_scale.
      page_table, kv_lengths, q_lengths: as in `paged_attention`. Holes hold
        no keys: their block score is -inf, and they are never read.
      topk: pages per query, 1..64, the local page included.
      ki_scale: per-tensor float32 scale of the cache (default 1).
      scale: score scale, default Di**-0.5.
      implementation: "auto" | "kernel" | "reference".
    Returns:
      ids [B, Q, Hi, topk] int32 logical pages: the selection rule of
      `indexer` (local page last, -1 padded), ready for `paged_attention`.
    """
    checks.check_implementation(implementation)
    checks.check_rank(qi, 4, "qi", "qi [B, Q, Hi, Di]")
    di = qi.shape[3]
    checks.check_float_dtypes(qi=qi)
    checks.check_head_dim(di, "qi")
    _check_cache(ki_cache, (None, checks.BLOCK_SIZE, di), "ki_cache", _KI_LAYOUT)
    page_table, q_lengths, kv_lengths = _check_requests(qi, page_table, q_lengths, kv_lengths, ki_cache.shape[0])
    topk = checks.check_topk(topk)
    ki_scale = _scale_operand(ki_scale, "ki_scale")
    scale = checks.resolve_scale(scale, di)
    if implementation == "reference":
        return reference.paged_indexer(qi, ki_cache, page_table, kv_lengths, topk=topk, ki_scale=ki_scale,
                                       q_lengths=q_lengths, scale=scale)
    (ids,) = _indexer_p.bind(ki_cache, ki_scale, qi, page_table, q_lengths, kv_lengths, topk=np.int64(topk),
                             scale=np.float32(scale), implementation=implementation)
    return ids
