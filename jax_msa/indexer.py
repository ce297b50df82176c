"""The MSA indexer (spec §3.1-3.3): block scores, top-k block selection, both fused.

Primitives:
  jax_msa_block_scores(qi, ki, q_lengths, kv_lengths; scale) -> scores
  jax_msa_topk_select(scores, q_lengths, kv_lengths; topk) -> ids
  jax_msa_indexer(qi, ki, q_lengths, kv_lengths; topk, scale, with_lse) -> ids[, lse]
None of them is differentiable: the selection is discrete (msa_attention wraps
the indexer in stop_gradient; its training signal is indexer_kl_loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jax_msa import _ffi
from jax_msa import _validation as checks
from jax_msa import reference
from jax_msa._primitives import define_primitive

_INDEX_LAYOUT = "qi [B, Sq, Hi, Di], ki [B, Sk, Di]"


def _cuda_kernel_takes(qi, *rest, implementation, **params) -> bool:
    """Whether the CUDA kernels (either family) take these inputs (cuda::block_scores_supported)."""
    return qi.dtype in (jnp.bfloat16, jnp.float16) and qi.shape[-1] in (64, 128)


def _block_scores_abstract(qi, ki, q_lengths, kv_lengths, *, scale):
    b, sq, hi, _ = qi.shape
    return [ShapedArray((b, sq, hi, checks.num_blocks(ki.shape[1])), jnp.float32)]


def _block_scores_reference(qi, ki, q_lengths, kv_lengths, *, scale):
    return [reference.block_scores(qi, ki, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=float(scale))]


_block_scores_p = define_primitive(
    "block_scores", abstract_eval=_block_scores_abstract, reference=_block_scores_reference,
    ffi_attributes=("scale",), sharding="bqhd,bkd,b,b->bqhn", kernel_takes={"cuda": _cuda_kernel_takes})


def _topk_select_abstract(scores, q_lengths, kv_lengths, *, topk):
    b, sq, hi, _ = scores.shape
    return [ShapedArray((b, sq, hi, topk), jnp.int32)]


def _topk_select_reference(scores, q_lengths, kv_lengths, *, topk):
    return [reference.topk_select(scores, topk=int(topk), q_lengths=q_lengths, kv_lengths=kv_lengths)]


_topk_select_p = define_primitive(
    "topk_select", abstract_eval=_topk_select_abstract, reference=_topk_select_reference,
    ffi_attributes=("topk",), sharding="bqhn,b,b->bqht")


def _indexer_abstract(qi, ki, q_lengths, kv_lengths, *, topk, scale, with_lse):
    b, sq, hi, _ = qi.shape
    ids = ShapedArray((b, sq, hi, topk), jnp.int32)
    return [ids, ShapedArray((b, sq, hi), jnp.float32)] if with_lse else [ids]


def _indexer_reference(qi, ki, q_lengths, kv_lengths, *, topk, scale, with_lse):
    result = reference.indexer(qi, ki, topk=int(topk), q_lengths=q_lengths, kv_lengths=kv_lengths,
                               scale=float(scale), return_lse=with_lse)
    return list(result) if with_lse else [result]


# The indexer on CUDA: indexer_scores -> indexer_select -> selected_lse, three
# kernels whose intermediates (block scores, and for the lse the per-block sums
# of exp(s - max)) are XLA buffers, so no handler allocates. Hidden primitives.
def _indexer_scores_abstract(qi, ki, q_lengths, kv_lengths, *, scale, with_sums):
    (scores,) = _block_scores_abstract(qi, ki, q_lengths, kv_lengths, scale=scale)
    return [scores, scores] if with_sums else [scores]


def _indexer_scores_reference(qi, ki, q_lengths, kv_lengths, *, scale, with_sums):
    """Block maxima (exact only up to each row's local block, as the kernel) and sums."""
    best = reference.block_scores(qi, ki, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=float(scale))
    if not with_sums:
        return [best]
    b, sq, hi, nb = best.shape
    sk = ki.shape[1]
    pos = (kv_lengths - q_lengths)[:, None] + jnp.arange(sq)[None, :]
    seen = (jnp.arange(sk)[None, None, :] <= pos[:, :, None]) & (jnp.arange(sq)[None, :, None] < q_lengths[:, None, None])
    s = float(scale) * jnp.einsum("bqhd,bkd->bqhk", qi.astype(jnp.float32), ki.astype(jnp.float32),
                                  precision=jax.lax.Precision.HIGHEST)
    m = jnp.repeat(jnp.where(jnp.isneginf(best), 0.0, best), checks.BLOCK_SIZE, axis=-1)[..., :sk]
    e = jnp.where(seen[:, :, None, :], jnp.exp(s - m), 0.0)
    e = jnp.pad(e, [(0, 0)] * 3 + [(0, nb * checks.BLOCK_SIZE - sk)])
    return [best, e.reshape(b, sq, hi, nb, checks.BLOCK_SIZE).sum(-1)]


_indexer_scores_p = define_primitive(
    "indexer_scores", abstract_eval=_indexer_scores_abstract, reference=_indexer_scores_reference,
    ffi_attributes=("scale",), sharding="bqhd,bkd,b,b->bqhn,bqhn")


_indexer_select_p = define_primitive(  # topk_select's rule, the indexer's own CUDA kernel
    "indexer_select", abstract_eval=_topk_select_abstract, reference=_topk_select_reference,
    ffi_attributes=("topk",), sharding="bqhn,b,b->bqht")


def _selected_lse_abstract(scores, sums, ids, q_lengths, kv_lengths):
    return [ShapedArray(scores.shape[:3], jnp.float32)]


def _selected_lse_reference(scores, sums, ids, q_lengths, kv_lengths):
    nb = scores.shape[-1]
    ok = (ids >= 0) & (ids < nb)
    safe = jnp.where(ok, ids, 0)
    best = jnp.where(ok, jnp.take_along_axis(scores, safe, -1), -jnp.inf)
    total = jnp.where(ok, jnp.take_along_axis(sums, safe, -1), 0.0)
    m = jnp.max(best, -1, keepdims=True)
    shift = jnp.where(jnp.isneginf(m), 0.0, m)
    lse = shift[..., 0] + jnp.log(jnp.sum(total * jnp.exp(best - shift), -1))
    return [jnp.where(jnp.isneginf(m[..., 0]), -jnp.inf, lse)]


_selected_lse_p = define_primitive(
    "selected_lse", abstract_eval=_selected_lse_abstract, reference=_selected_lse_reference,
    ffi_attributes=(), sharding="bqhn,bqhn,bqht,b,b->bqh")


def _indexer_cuda(qi, ki, q_lengths, kv_lengths, *, topk, scale, with_lse, implementation):
    parts = _indexer_scores_p.bind(qi, ki, q_lengths, kv_lengths, scale=scale, with_sums=with_lse,
                                   implementation=implementation)
    (ids,) = _indexer_select_p.bind(parts[0], q_lengths, kv_lengths, topk=topk, implementation=implementation)
    if not with_lse:
        return [ids]
    (lse,) = _selected_lse_p.bind(parts[0], parts[1], ids, q_lengths, kv_lengths, implementation=implementation)
    return [ids, lse]


_indexer_p = define_primitive(
    "indexer", abstract_eval=_indexer_abstract, reference=_indexer_reference,
    ffi_attributes=("topk", "scale"), sharding="bqhd,bkd,b,b->bqht,bqh",
    kernel_takes={"cuda": _cuda_kernel_takes},
    kernel_lowering={"cuda": _indexer_cuda} if _ffi.has_kernel("jax_msa_indexer_scores", "cuda") else None,
    portable_cuda_targets=("jax_msa_indexer_scores", "jax_msa_indexer_select", "jax_msa_selected_lse"))


def _check_index_inputs(qi, ki, q_lengths, kv_lengths):
    checks.check_rank(qi, 4, "qi", _INDEX_LAYOUT)
    checks.check_rank(ki, 3, "ki", _INDEX_LAYOUT)
    b, sq, _, di = qi.shape
    checks.check_shape(ki, (b, ki.shape[1], di), "ki", _INDEX_LAYOUT)
    checks.check_float_dtypes(qi=qi, ki=ki)
    checks.check_head_dim(di, "qi")
    q_lengths = checks.lengths_or_default(q_lengths, b, sq, "q_lengths")
    kv_lengths = checks.lengths_or_default(kv_lengths, b, ki.shape[1], "kv_lengths")
    checks.check_lengths_order(q_lengths, kv_lengths)
    return q_lengths, kv_lengths


def block_scores(
    qi: jax.Array,
    ki: jax.Array,
    *,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Per-block maximum of the index scores (spec §3.1).

    Args:
      qi: index queries [B, Sq, Hi, Di] (float32, bfloat16 or float16).
      ki: shared index keys [B, Sk, Di], same dtype.
      q_lengths, kv_lengths: valid lengths [B] (default Sq, Sk); bottom-right aligned.
      scale: score scale, default Di**-0.5.
      implementation: "auto" | "kernel" | "reference".
    Returns:
      scores [B, Sq, Hi, ceil(Sk/128)] float32, -inf where a block has no visible key.
    """
    checks.check_implementation(implementation)
    q_lengths, kv_lengths = _check_index_inputs(qi, ki, q_lengths, kv_lengths)
    scale = checks.resolve_scale(scale, qi.shape[-1])
    if implementation == "reference":
        return reference.block_scores(qi, ki, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=scale)
    (scores,) = _block_scores_p.bind(qi, ki, q_lengths, kv_lengths, scale=np.float32(scale),
                                     implementation=implementation)
    return scores


def topk_select(
    scores: jax.Array,
    *,
    topk: int = 16,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    kv_seq_len: int | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """MSA's block selection rule (spec §3.2) applied to block scores.

    Args:
      scores: [B, Sq, Hi, NB] float32 block scores (e.g. from `block_scores`).
      topk: blocks per query, 1..64; the local block is always the last valid entry.
      q_lengths, kv_lengths: valid lengths [B]; kv_lengths default to
        `kv_seq_len`, itself defaulting to Sq (self-attention).
      implementation: "auto" | "kernel" | "reference".
    Returns:
      ids [B, Sq, Hi, topk] int32, -1 padded.
    """
    checks.check_implementation(implementation)
    checks.check_rank(scores, 4, "scores", "[B, Sq, Hi, NB]")
    if jnp.result_type(scores) != jnp.float32:
        raise TypeError(f"scores must be float32, got {jnp.result_type(scores)}")
    topk = checks.check_topk(topk)
    b, sq, _, nb = scores.shape
    kv_seq_len = sq if kv_seq_len is None else int(kv_seq_len)
    if checks.num_blocks(kv_seq_len) != nb:
        raise ValueError(f"scores has {nb} blocks but kv_seq_len={kv_seq_len} needs {checks.num_blocks(kv_seq_len)}; "
                         "pass kv_seq_len (the key sequence length) when Sk != Sq")
    q_lengths = checks.lengths_or_default(q_lengths, b, sq, "q_lengths")
    kv_lengths = checks.lengths_or_default(kv_lengths, b, kv_seq_len, "kv_lengths")
    checks.check_lengths_order(q_lengths, kv_lengths)
    if implementation == "reference":
        return reference.topk_select(scores, topk=topk, q_lengths=q_lengths, kv_lengths=kv_lengths)
    (ids,) = _topk_select_p.bind(scores, q_lengths, kv_lengths, topk=np.int64(topk), implementation=implementation)
    return ids


def indexer(
    qi: jax.Array,
    ki: jax.Array,
    *,
    topk: int = 16,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Fused block scores + top-k selection (spec §3.3); no score matrix in memory.

    Args:
      qi: index queries [B, Sq, Hi, Di]; ki: index keys [B, Sk, Di].
      topk: blocks per query, 1..64.
      q_lengths, kv_lengths: valid lengths [B], bottom-right aligned.
      scale: default Di**-0.5.
      return_lse: also return lse [B, Sq, Hi] float32: logsumexp of the scaled
        index scores over the visible keys of the selected blocks.
      implementation: "auto" | "kernel" | "reference".
    Returns:
      ids [B, Sq, Hi, topk] int32 (local block last, -1 padded), and lse if asked.
    """
    checks.check_implementation(implementation)
    q_lengths, kv_lengths = _check_index_inputs(qi, ki, q_lengths, kv_lengths)
    topk = checks.check_topk(topk)
    scale = checks.resolve_scale(scale, qi.shape[-1])
    if implementation == "reference":
        return reference.indexer(qi, ki, topk=topk, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=scale,
                                 return_lse=return_lse)
    results = _indexer_p.bind(qi, ki, q_lengths, kv_lengths, topk=np.int64(topk), scale=np.float32(scale),
                              with_lse=bool(return_lse), implementation=implementation)
    return tuple(results) if return_lse else results[0]
