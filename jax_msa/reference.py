"""Pure-JAX reference of every op of ``jax_msa`` (see ``MSA_SPEC.md``).

This module is the *oracle* the kernels are tested against, and the fallback
path used where no kernel applies. It is written for clarity first, but it is
also memory-safe at long sequence lengths (T up to 128K):

* everything is computed in float32 (inputs are upcast, matmuls run at
  ``Precision.HIGHEST``); ``out`` is cast back to the dtype of ``q``;
* queries are processed in chunks of :data:`QUERY_CHUNK` rows with
  ``jax.lax.map`` (each chunk under ``jax.checkpoint``, so the backward pass
  also holds one chunk at a time): at most ``QUERY_CHUNK x Sk`` scores, or the
  ``QUERY_CHUNK x topk x 128`` selected keys, exist at once, never the
  ``Sq x Sk`` matrix. Inputs with ``Sq <= QUERY_CHUNK`` take a single chunk;
* all shapes are static, so every function works under ``jax.jit``,
  ``jax.grad`` and ``jax.vmap``.

Conventions (``MSA_SPEC.md`` section 2): layout ``[B, S, H, D]``; optional
``q_lengths [B]`` / ``kv_lengths [B]`` int32 (default: full ``Sq`` / ``Sk``);
query ``i`` of row ``b`` sits at position ``p = kv_lengths[b] - q_lengths[b] + i``
(bottom-right alignment) and sees keys ``j <= p`` with ``j < kv_lengths[b]``;
padded query rows (``i >= q_lengths[b]``) give zeros (out), ``-inf`` (lse and
block scores) and ``-1`` (ids). Blocks hold :data:`BLOCK_SIZE` keys; the local
block of a query is ``p // BLOCK_SIZE``. Query head ``h`` uses KV group
``h // (Hq // Hkv)``.

No argument validation is done here (the public API validates).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "BLOCK_SIZE",
    "QUERY_CHUNK",
    "block_scores",
    "topk_select",
    "indexer",
    "sparse_attention",
    "dot_product_attention",
    "msa_attention",
    "paged_attention",
    "paged_indexer",
    "paged_block_scores",
    "indexer_kl_divergence",
    "indexer_kl_loss",
]

#: Keys per block (also the page size of paged KV caches).
BLOCK_SIZE = 128
#: Queries processed at once. Read at call (trace) time, so tests may patch it.
QUERY_CHUNK = 256
#: Matmul precision: true float32 accumulation of float32 operands.
PRECISION = lax.Precision.HIGHEST

Array = jax.Array
Lengths = Optional[Union[Array, np.ndarray, Sequence[int]]]

_NEG_INF = -jnp.inf


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _cdiv(a, b):
    return -(-a // b)


def _lengths(lengths: Lengths, batch: int, full: int) -> Array:
    """int32 [B] lengths; ``full`` when ``lengths`` is None."""
    if lengths is None:
        return jnp.full((batch,), full, jnp.int32)
    return jnp.broadcast_to(jnp.asarray(lengths).astype(jnp.int32), (batch,))


def _query_positions(start, size: int, q_len: Array, kv_len: Array):
    """Positions and validity of queries ``start .. start+size-1`` of every row.

    Returns ``pos [B, size]`` (``p = kv_len - q_len + i``) and
    ``valid [B, size]`` (``i < q_len``).
    """
    i = start + jnp.arange(size, dtype=jnp.int32)
    pos = (kv_len - q_len)[:, None] + i[None, :]
    valid = i[None, :] < q_len[:, None]
    return pos, valid


def _map_query_chunks(fn: Callable, xs: Sequence[Array], seq_len: int):
    """Apply ``fn(start, *chunks)`` to consecutive query chunks.

    Every array of ``xs`` has its query axis at position 1 (``[B, Sq, ...]``);
    ``fn`` receives the first query index of the chunk (int32 scalar) and the
    chunks ``[B, C, ...]`` and returns a pytree of arrays ``[B, C, ...]``.
    The results are concatenated back to ``[B, Sq, ...]``. The last chunk is
    zero padded; padded queries have ``i >= Sq >= q_len`` and are therefore
    treated as padded rows by ``fn``.
    """
    chunk = int(QUERY_CHUNK)
    if seq_len <= chunk:
        return fn(jnp.int32(0), *xs)
    n = _cdiv(seq_len, chunk)
    pad = n * chunk - seq_len

    def split(x):  # [B, Sq, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def merge(y):  # [n, B, chunk, ...] -> [B, Sq, ...]
        y = jnp.moveaxis(y, 0, 1)
        y = y.reshape(y.shape[0], n * chunk, *y.shape[3:])
        return y[:, :seq_len]

    # Under jax.grad the checkpoint keeps one chunk of intermediates alive at a
    # time (they are recomputed chunk by chunk in the backward pass).
    body = jax.checkpoint(lambda args: fn(args[0], *args[1:]), prevent_cse=False)
    starts = jnp.arange(n, dtype=jnp.int32) * chunk
    outs = lax.map(body, (starts, *[split(x) for x in xs]))
    return jax.tree_util.tree_map(merge, outs)


def _masked_softmax(logits: Array, mask: Array):
    """Softmax over the last axis restricted to ``mask``, and its logsumexp.

    Returns ``(probs, lse)``: ``probs`` is 0 where masked and all-zero for a
    row with no unmasked entry, whose ``lse`` is ``-inf``. Uses the "safe max"
    trick, so gradients are finite (and zero where masked) even for empty rows.
    """
    s = jnp.where(mask, logits, _NEG_INF)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)  # exactly 0 where masked
    denom = jnp.sum(p, axis=-1, keepdims=True)
    nonempty = denom > 0
    denom = jnp.where(nonempty, denom, 1.0)
    lse = jnp.where(nonempty, m + jnp.log(denom), _NEG_INF)
    return p / denom, lse[..., 0]


def _index_logits(qi_c: Array, ki: Array, start, q_len, kv_len, scale) -> Array:
    """Masked index logits of one query chunk.

    ``qi_c [B, C, Hi, Di]``, ``ki [B, Sk, Di]`` (float32) ->
    ``s [B, C, Hi, Sk]`` = ``scale * <qi, ki>`` where key ``j`` is visible
    (``j <= p``, ``j < kv_len``, valid query), ``-inf`` elsewhere.
    """
    c, sk = qi_c.shape[1], ki.shape[1]
    pos, valid = _query_positions(start, c, q_len, kv_len)
    j = jnp.arange(sk, dtype=jnp.int32)
    visible = (
        (j[None, None, :] <= pos[:, :, None])
        & (j[None, None, :] < kv_len[:, None, None])
        & valid[:, :, None]
    )  # [B, C, Sk]
    s = scale * jnp.einsum("bchd,bkd->bchk", qi_c, ki, precision=PRECISION)
    return jnp.where(visible[:, :, None, :], s, _NEG_INF)


def _block_max(s: Array) -> Array:
    """``[..., Sk]`` -> ``[..., ceil(Sk/128)]``: max over each block of keys."""
    sk = s.shape[-1]
    nb = _cdiv(sk, BLOCK_SIZE)
    pad = [(0, 0)] * (s.ndim - 1) + [(0, nb * BLOCK_SIZE - sk)]
    s = jnp.pad(s, pad, constant_values=_NEG_INF)
    return jnp.max(s.reshape(*s.shape[:-1], nb, BLOCK_SIZE), axis=-1)


def _select(scores: Array, local: Array, valid: Array, topk: int) -> Array:
    """The selection rule (spec 3.2) for ``scores [B, C, H, nb]``.

    ``local [B, C]`` is the local block ``L`` of each query, ``valid [B, C]``
    marks real (non padded) queries. Returns int32 ids ``[B, C, H, topk]``.
    """
    b, c, h, nb = scores.shape
    L = local[:, :, None, None]  # [B, C, 1, 1]
    slot = jnp.arange(topk, dtype=jnp.int32)

    # Few visible blocks (L + 1 <= topk): 0, 1, ..., L, then -1.
    few = jnp.where(slot <= L, slot, -1)

    # Otherwise: the topk - 1 best history blocks c < L, then L.
    # NaN ranks like -inf; -0.0 is made +0.0 (top_k orders -0.0 below +0.0).
    # top_k breaks ties toward the lower index, and every masked block c >= L
    # has a higher index than every history block, so a history block scored
    # -inf/NaN is still preferred to a masked one.
    local_col = jnp.broadcast_to(L, (b, c, h, 1))
    if topk > 1:
        block = jnp.arange(nb, dtype=jnp.int32)
        hist = jnp.where((block < L) & ~jnp.isnan(scores), scores, _NEG_INF)
        hist = jnp.where(hist == 0, 0.0, hist)
        if nb < topk - 1:  # only reachable when every query takes `few`
            hist = jnp.pad(
                hist, [(0, 0)] * 3 + [(0, topk - 1 - nb)], constant_values=_NEG_INF
            )
        _, best = lax.top_k(hist, topk - 1)
        many = jnp.concatenate([best.astype(jnp.int32), local_col], axis=-1)
    else:
        many = local_col

    ids = jnp.where(L + 1 <= topk, few, many)
    return jnp.where(valid[:, :, None, None], ids, -1).astype(jnp.int32)


def _chosen_keys(ids: Array, sk: int) -> Array:
    """``ids [..., topk]`` -> bool ``[..., Sk]``: key ``j`` lies in a selected block."""
    nb = _cdiv(sk, BLOCK_SIZE)
    chosen = jnp.any(ids[..., :, None] == jnp.arange(nb, dtype=jnp.int32), axis=-2)
    return jnp.repeat(chosen, BLOCK_SIZE, axis=-1)[..., :sk]


# --------------------------------------------------------------------------- #
# Indexer
# --------------------------------------------------------------------------- #
def block_scores(
    qi: Array,
    ki: Array,
    *,
    q_lengths: Lengths = None,
    kv_lengths: Lengths = None,
    scale: Optional[float] = None,
) -> Array:
    """The indexer's proxy block scores (spec 3.1).

    Args:
      qi: index queries ``[B, Sq, Hi, Di]``.
      ki: the shared index key head ``[B, Sk, Di]``.
      q_lengths, kv_lengths: optional int32 ``[B]`` valid lengths.
      scale: logit scale, default ``Di**-0.5``.

    Returns:
      float32 ``[B, Sq, Hi, ceil(Sk/128)]``: ``scores[b, i, h, c]`` is the max
      over the visible keys ``j`` of block ``c`` of ``scale * <qi[b,i,h], ki[b,j]>``;
      ``-inf`` where block ``c`` holds no visible key (and for padded queries).
    """
    bsz, sq, _, di = qi.shape
    sk = ki.shape[1]
    scale = di**-0.5 if scale is None else scale
    q_len = _lengths(q_lengths, bsz, sq)
    kv_len = _lengths(kv_lengths, bsz, sk)
    ki = ki.astype(jnp.float32)

    def chunk(start, qi_c):
        s = _index_logits(qi_c, ki, start, q_len, kv_len, scale)
        return _block_max(s)

    return _map_query_chunks(chunk, [qi.astype(jnp.float32)], sq)


def topk_select(
    scores: Array,
    *,
    topk: int = 16,
    q_lengths: Lengths = None,
    kv_lengths: Lengths = None,
    kv_seq_len: Optional[int] = None,
) -> Array:
    """Top-k block selection (spec 3.2).

    Args:
      scores: block scores ``[B, Sq, Hi, nb]`` (any float dtype).
      topk: number of blocks per query (local block included).
      q_lengths: optional int32 ``[B]``; default ``Sq``.
      kv_lengths: optional int32 ``[B]``; default ``kv_seq_len`` if given,
        else ``Sq`` (self attention).
      kv_seq_len: key sequence length used for the default ``kv_lengths``.

    Returns:
      int32 ids ``[B, Sq, Hi, topk]``. With ``L`` the local block of the query:
      if ``L + 1 <= topk``, ``0, 1, ..., L`` then ``-1``; otherwise the
      ``topk - 1`` history blocks ``c < L`` of highest score in descending
      order (ties toward the lower id, NaN ranks like ``-inf``), then ``L``
      in the last slot. Padded queries get all ``-1``.
    """
    bsz, sq = scores.shape[:2]
    q_len = _lengths(q_lengths, bsz, sq)
    kv_len = _lengths(kv_lengths, bsz, sq if kv_seq_len is None else kv_seq_len)
    pos, valid = _query_positions(0, sq, q_len, kv_len)
    return _select(scores.astype(jnp.float32), pos // BLOCK_SIZE, valid, topk)


def indexer(
    qi: Array,
    ki: Array,
    *,
    topk: int = 16,
    q_lengths: Lengths = None,
    kv_lengths: Lengths = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Fused ``block_scores`` + ``topk_select`` (spec 3.3).

    Args:
      qi: index queries ``[B, Sq, Hi, Di]``.
      ki: the shared index key head ``[B, Sk, Di]``.
      topk: blocks selected per query.
      q_lengths, kv_lengths: optional int32 ``[B]`` valid lengths.
      scale: logit scale, default ``Di**-0.5``.
      return_lse: also return the logsumexp.

    Returns:
      ``ids`` int32 ``[B, Sq, Hi, topk]`` (as :func:`topk_select`), or
      ``(ids, lse)`` with ``lse [B, Sq, Hi]`` float32: the logsumexp of
      ``scale * <qi, ki[j]>`` over the visible keys ``j`` of the selected
      blocks (``-inf`` for padded queries).
    """
    bsz, sq, _, di = qi.shape
    sk = ki.shape[1]
    scale = di**-0.5 if scale is None else scale
    q_len = _lengths(q_lengths, bsz, sq)
    kv_len = _lengths(kv_lengths, bsz, sk)
    ki = ki.astype(jnp.float32)

    def chunk(start, qi_c):
        s = _index_logits(qi_c, ki, start, q_len, kv_len, scale)
        pos, valid = _query_positions(start, qi_c.shape[1], q_len, kv_len)
        ids = _select(_block_max(s), pos // BLOCK_SIZE, valid, topk)
        if not return_lse:
            return ids
        _, lse = _masked_softmax(s, _chosen_keys(ids, sk))
        return ids, lse

    return _map_query_chunks(chunk, [qi.astype(jnp.float32)], sq)


# --------------------------------------------------------------------------- #
# Attention
# --------------------------------------------------------------------------- #
def sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    ids: Array,
    *,
    q_lengths: Lengths = None,
    kv_lengths: Lengths = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """MSA block-sparse attention (spec 3.4).

    Args:
      q: queries ``[B, Sq, Hq, D]``.
      k, v: keys / values ``[B, Sk, Hkv, D]``; ``Hq % Hkv == 0``.
      ids: selected blocks ``[B, Sq, Hkv, topk]`` int; query head ``h`` uses
        ``ids[..., h // (Hq // Hkv), :]``. Ids outside
        ``[0, ceil(kv_lengths[b] / 128))`` are skipped like ``-1``.
      q_lengths, kv_lengths: optional int32 ``[B]`` valid lengths.
      scale: logit scale, default ``D**-0.5``.
      return_lse: also return the logsumexp.

    Returns:
      ``out [B, Sq, Hq, D]`` (dtype of ``q``), or ``(out, lse)`` with
      ``lse [B, Sq, Hq]`` float32. The attended set is every key ``j`` of every
      selected block with ``j <= p`` and ``j < kv_lengths[b]``; an empty set
      gives ``out = 0``, ``lse = -inf``. Differentiable in ``q, k, v``.
    """
    bsz, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    topk = ids.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q_len = _lengths(q_lengths, bsz, sq)
    kv_len = _lengths(kv_lengths, bsz, sk)
    n_blocks = _cdiv(sk, BLOCK_SIZE)
    usable_blocks = _cdiv(kv_len, BLOCK_SIZE)  # [B]

    def to_blocks(x):  # [B, Sk, Hkv, D] -> [B, Hkv, nb, 128, D] float32
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, n_blocks * BLOCK_SIZE - sk), (0, 0), (0, 0)])
        x = x.reshape(bsz, n_blocks, BLOCK_SIZE, hkv, d)
        return jnp.transpose(x, (0, 3, 1, 2, 4))

    k_blocks, v_blocks = to_blocks(k), to_blocks(v)
    b_idx = jnp.arange(bsz)[:, None, None, None]
    g_idx = jnp.arange(hkv)[None, None, :, None]

    def chunk(start, q_c, ids_c):
        c = q_c.shape[1]
        pos, valid = _query_positions(start, c, q_len, kv_len)
        ok = (ids_c >= 0) & (ids_c < usable_blocks[:, None, None, None])
        safe_ids = jnp.where(ok, ids_c, 0).astype(jnp.int32)  # never out of bounds
        # Gather the selected blocks: [B, C, Hkv, topk, 128, D].
        kc = k_blocks[b_idx, g_idx, safe_ids]
        vc = v_blocks[b_idx, g_idx, safe_ids]
        j = safe_ids[..., None] * BLOCK_SIZE + jnp.arange(BLOCK_SIZE, dtype=jnp.int32)
        mask = (
            ok[..., None]
            & (j <= pos[:, :, None, None, None])
            & (j < kv_len[:, None, None, None, None])
            & valid[:, :, None, None, None]
        )  # [B, C, Hkv, topk, 128]
        mask = mask.reshape(bsz, c, hkv, 1, topk * BLOCK_SIZE)
        kc = kc.reshape(bsz, c, hkv, topk * BLOCK_SIZE, d)
        vc = vc.reshape(bsz, c, hkv, topk * BLOCK_SIZE, d)
        qg = q_c.reshape(bsz, c, hkv, group, d)
        logits = scale * jnp.einsum("bcgnd,bcgkd->bcgnk", qg, kc, precision=PRECISION)
        probs, lse = _masked_softmax(logits, mask)
        out = jnp.einsum("bcgnk,bcgkd->bcgnd", probs, vc, precision=PRECISION)
        return out.reshape(bsz, c, hq, d), lse.reshape(bsz, c, hq)

    # ids keep their integer dtype until masked (an int64 id must not wrap).
    out, lse = _map_query_chunks(chunk, [q.astype(jnp.float32), ids], sq)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    q_lengths: Lengths = None,
    kv_lengths: Lengths = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Dense (GQA) attention with lengths and bottom-right causal alignment (spec 3.6).

    Args:
      q: queries ``[B, Sq, Hq, D]``.
      k, v: keys / values ``[B, Sk, Hkv, D]``; ``Hq % Hkv == 0``.
      causal: query ``i`` sees keys ``j <= p`` (``p = kv_len - q_len + i``);
        otherwise every key ``j < kv_len``.
      q_lengths, kv_lengths: optional int32 ``[B]`` valid lengths.
      scale: logit scale, default ``D**-0.5``.
      return_lse: also return the logsumexp.

    Returns:
      ``out [B, Sq, Hq, D]`` (dtype of ``q``), or ``(out, lse)`` with
      ``lse [B, Sq, Hq]`` float32. Padded queries and queries that see no key
      give ``out = 0``, ``lse = -inf``. Differentiable in ``q, k, v``.
    """
    bsz, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    q_len = _lengths(q_lengths, bsz, sq)
    kv_len = _lengths(kv_lengths, bsz, sk)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    j = jnp.arange(sk, dtype=jnp.int32)

    def chunk(start, q_c):
        c = q_c.shape[1]
        pos, valid = _query_positions(start, c, q_len, kv_len)
        mask = (j[None, None, :] < kv_len[:, None, None]) & valid[:, :, None]
        if causal:
            mask = mask & (j[None, None, :] <= pos[:, :, None])
        mask = mask[:, :, None, None, :]  # [B, C, 1, 1, Sk]
        qg = q_c.reshape(bsz, c, hkv, group, d)
        logits = scale * jnp.einsum("bcgnd,bkgd->bcgnk", qg, k32, precision=PRECISION)
        probs, lse = _masked_softmax(logits, mask)
        out = jnp.einsum("bcgnk,bkgd->bcgnd", probs, v32, precision=PRECISION)
        return out.reshape(bsz, c, hq, d), lse.reshape(bsz, c, hq)

    out, lse = _map_query_chunks(chunk, [q.astype(jnp.float32)], sq)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def msa_attention(
    q: Array,
    k: Array,
    v: Array,
    qi: Array,
    ki: Array,
    *,
    topk: int = 16,
    q_lengths: Lengths = None,
    kv_lengths: Lengths = None,
    scale: Optional[float] = None,
    index_scale: Optional[float] = None,
    return_ids: bool = False,
):
    """The whole MSA layer (spec 3.5): ``indexer`` then ``sparse_attention``.

    Args:
      q: queries ``[B, Sq, Hq, D]``; k, v: ``[B, Sk, Hkv, D]``.
      qi: index queries ``[B, Sq, Hi, Di]`` with ``Hi == Hkv`` (one index head
        per KV group); ki: index keys ``[B, Sk, Di]``.
      topk: blocks per query.
      q_lengths, kv_lengths: optional int32 ``[B]`` valid lengths.
      scale: attention scale (default ``D**-0.5``); index_scale: indexer scale
        (default ``Di**-0.5``).
      return_ids: also return the ids.

    Returns:
      ``out [B, Sq, Hq, D]`` (dtype of ``q``), or ``(out, ids)`` with
      ``ids [B, Sq, Hkv, topk]`` int32. The selection carries no gradient
      (the indexer runs under ``stop_gradient``); ``out`` is differentiable
      in ``q, k, v``.
    """
    if qi.shape[2] != k.shape[2]:
        raise ValueError(
            f"msa_attention needs one index head per KV group: qi.shape={qi.shape} "
            f"has {qi.shape[2]} heads, k.shape={k.shape} has {k.shape[2]}"
        )
    ids = indexer(
        lax.stop_gradient(qi),
        lax.stop_gradient(ki),
        topk=topk,
        q_lengths=q_lengths,
        kv_lengths=kv_lengths,
        scale=index_scale,
    )
    ids = lax.stop_gradient(ids)
    out = sparse_attention(
        q, k, v, ids, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=scale
    )
    return (out, ids) if return_ids else out


# --------------------------------------------------------------------------- #
# Paged inference (spec 3.7) and the indexer's KL loss (spec 3.8)
# --------------------------------------------------------------------------- #
Scale = Union[float, Array]


def _dequantise(x: Array, scale: Scale) -> Array:
    """Stored cache values as float32: ``x * scale`` (one scale per tensor)."""
    return x.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)


def _paged_lengths(q_lengths: Lengths, kv_lengths: Lengths, batch: int, nq: int, max_pages: int):
    """Lengths clamped as the kernels clamp them: ``[0, Q]`` and ``[0, max_pages * 128]``."""
    q_len = jnp.clip(_lengths(q_lengths, batch, nq), 0, nq)
    kv_len = jnp.clip(_lengths(kv_lengths, batch, max_pages * BLOCK_SIZE), 0, max_pages * BLOCK_SIZE)
    return q_len, kv_len


def _stored_keys(page_table: Array, num_pages: int, kv_len: Array):
    """Which logical keys exist: ``[B, max_pages * 128]`` (``j < kv_len``, page
    not a hole), and the physical page of every logical page (0 for holes)."""
    ok = (page_table >= 0) & (page_table < num_pages)
    j = jnp.arange(page_table.shape[1] * BLOCK_SIZE, dtype=jnp.int32)
    stored = jnp.repeat(ok, BLOCK_SIZE, axis=1) & (j[None, :] < kv_len[:, None])
    return stored, jnp.where(ok, page_table, 0)


def _group_logits(q_c: Array, kc: Array, scale) -> Array:
    """``scale * <q, k>`` by KV group: ``q_c [B, C, Hq, D]``, ``kc [B, C or 1, Hkv, K, D]``
    -> ``[B, C, Hkv, G, K]`` (query head ``h`` is row ``h % G`` of group ``h // G``)."""
    b, c, hq, d = q_c.shape
    hkv = kc.shape[2]
    qg = q_c.reshape(b, c, hkv, hq // hkv, d)
    return scale * jnp.matmul(qg, jnp.swapaxes(kc, -1, -2), precision=PRECISION)


def _attend(q_c: Array, kc: Array, vc: Array, mask: Array, scale):
    """Attention of one query chunk over a key set per KV group.

    ``q_c [B, C, Hq, D]``; ``kc, vc [B, C or 1, Hkv, K, D]`` (finite: zero where
    no query may see them); ``mask [B, C, Hkv, K]``. Returns ``out [B, C, Hq, D]``
    and ``lse [B, C, Hq]`` (``0`` and ``-inf`` for an empty set).
    """
    b, c, hq, d = q_c.shape
    probs, lse = _masked_softmax(_group_logits(q_c, kc, scale), mask[:, :, :, None, :])
    out = jnp.matmul(probs, vc, precision=PRECISION)
    return out.reshape(b, c, hq, d), lse.reshape(b, c, hq)


def _selected_keys(ids: Array, ok: Array, pos: Array, kv_len: Array, valid: Array) -> Array:
    """Keys of the selected blocks ``ids [B, C, H, topk]`` (only where ``ok``)
    that each query sees (``j <= p``, ``j < kv_len``): ``[B, C, H, topk * 128]``."""
    j = ids[..., None] * BLOCK_SIZE + jnp.arange(BLOCK_SIZE, dtype=jnp.int32)
    mask = (
        ok[..., None]
        & (j <= pos[:, :, None, None, None])
        & (j < kv_len[:, None, None, None, None])
        & valid[:, :, None, None, None]
    )
    return mask.reshape(*ids.shape[:3], -1)


def paged_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    page_table: Array,
    kv_lengths: Lengths,
    ids: Optional[Array] = None,
    *,
    k_scale: Scale = 1.0,
    v_scale: Scale = 1.0,
    q_lengths: Lengths = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    out_dtype=jnp.bfloat16,
):
    """Attention of new queries over a paged KV cache (spec 3.7).

    Args:
      q: queries ``[B, Q, Hq, D]``; query ``t`` of request ``b`` sits at
        ``kv_lengths[b] - q_lengths[b] + t``.
      k_cache, v_cache: pages ``[num_pages, Hkv, 128, D]`` (any float type,
        float8 included); the value of an element is ``stored * scale``.
      page_table: ``[B, max_pages]`` logical page -> physical page; entries
        ``< 0`` or ``>= num_pages`` are holes holding no keys.
      kv_lengths: ``[B]`` cached tokens per request, the new ones included.
      ids: ``None`` (dense: every visible key) or the selected logical pages
        ``[B, Q, Hkv, topk]``, skipped like ``sparse_attention`` skips ids.
      k_scale, v_scale: per-tensor scales of the caches.
      q_lengths: optional ``[B]`` valid queries (default ``Q``).
      scale: logit scale, default ``D**-0.5``.
      return_lse: also return the logsumexp.
      out_dtype: dtype of ``out``.

    Returns:
      ``out [B, Q, Hq, D]`` in ``out_dtype``, or ``(out, lse)`` with
      ``lse [B, Q, Hq]`` float32; ``0`` / ``-inf`` for padded queries and empty sets.
    """
    bsz, nq, hq, d = q.shape
    num_pages, hkv = k_cache.shape[:2]
    max_pages = page_table.shape[1]
    scale = d**-0.5 if scale is None else scale
    page_table = jnp.asarray(page_table, jnp.int32)
    q_len, kv_len = _paged_lengths(q_lengths, kv_lengths, bsz, nq, max_pages)

    if ids is None:
        stored, physical = _stored_keys(page_table, num_pages, kv_len)

        def logical(cache, cache_scale):  # [B, 1, Hkv, max_pages * 128, D]
            x = jnp.swapaxes(_dequantise(cache[physical], cache_scale), 1, 2)
            x = x.reshape(bsz, 1, hkv, max_pages * BLOCK_SIZE, d)
            return jnp.where(stored[:, None, None, :, None], x, 0.0)

        kc, vc = logical(k_cache, k_scale), logical(v_cache, v_scale)
        j = jnp.arange(max_pages * BLOCK_SIZE, dtype=jnp.int32)

        def chunk(start, q_c):
            c = q_c.shape[1]
            pos, valid = _query_positions(start, c, q_len, kv_len)
            mask = stored[:, None, :] & (j <= pos[:, :, None]) & valid[:, :, None]
            mask = jnp.broadcast_to(mask[:, :, None, :], (bsz, c, hkv, mask.shape[-1]))
            return _attend(q_c, kc, vc, mask, scale)

        xs = [q.astype(jnp.float32)]
    else:
        usable_pages = _cdiv(kv_len, BLOCK_SIZE)
        b_idx = jnp.arange(bsz)[:, None, None, None]
        g_idx = jnp.arange(hkv)[None, None, :, None]

        def chunk(start, q_c, ids_c):
            c = q_c.shape[1]
            pos, valid = _query_positions(start, c, q_len, kv_len)
            ok = (ids_c >= 0) & (ids_c < usable_pages[:, None, None, None])
            logical_ids = jnp.where(ok, ids_c, 0).astype(jnp.int32)
            physical = page_table[b_idx, logical_ids]
            ok = ok & (physical >= 0) & (physical < num_pages)
            physical = jnp.where(ok, physical, 0)  # never out of bounds
            mask = _selected_keys(logical_ids, ok, pos, kv_len, valid)

            def pages(cache, cache_scale):  # [B, C, Hkv, topk * 128, D]
                x = _dequantise(cache[physical, g_idx], cache_scale).reshape(bsz, c, hkv, -1, d)
                return jnp.where(mask[..., None], x, 0.0)

            return _attend(q_c, pages(k_cache, k_scale), pages(v_cache, v_scale), mask, scale)

        xs = [q.astype(jnp.float32), ids]

    out, lse = _map_query_chunks(chunk, xs, nq)
    out = out.astype(out_dtype)
    return (out, lse) if return_lse else out


def paged_indexer(
    qi: Array,
    ki_cache: Array,
    page_table: Array,
    kv_lengths: Lengths,
    *,
    topk: int = 16,
    ki_scale: Scale = 1.0,
    q_lengths: Lengths = None,
    scale: Optional[float] = None,
) -> Array:
    """The indexer (spec 3.3) over a paged index-key cache (spec 3.7).

    Args:
      qi: index queries ``[B, Q, Hi, Di]``, positioned as in :func:`paged_attention`.
      ki_cache: index-key pages ``[num_pages, 128, Di]``, value ``stored * ki_scale``.
      page_table, kv_lengths, q_lengths: as in :func:`paged_attention`; holes
        hold no keys (their block score is ``-inf``).
      topk: pages selected per query (local page included).
      ki_scale: per-tensor scale of the cache.
      scale: logit scale, default ``Di**-0.5``.

    Returns:
      ids ``[B, Q, Hi, topk]`` int32 logical pages, as :func:`topk_select`.
    """
    nq, di = qi.shape[1], qi.shape[3]
    scale = di**-0.5 if scale is None else scale
    q_len, kv_len, ki, stored = _paged_index_keys(qi, ki_cache, page_table, kv_lengths, ki_scale, q_lengths)

    def chunk(start, qi_c):
        scores = _paged_block_max(qi_c, ki, stored, start, q_len, kv_len, scale)
        pos, valid = _query_positions(start, qi_c.shape[1], q_len, kv_len)
        return _select(scores, pos // BLOCK_SIZE, valid, topk)

    return _map_query_chunks(chunk, [qi.astype(jnp.float32)], nq)


def paged_block_scores(
    qi: Array,
    ki_cache: Array,
    page_table: Array,
    kv_lengths: Lengths,
    *,
    ki_scale: Scale = 1.0,
    q_lengths: Lengths = None,
    scale: Optional[float] = None,
) -> Array:
    """:func:`block_scores` (spec 3.1) over a paged index-key cache, the scores
    :func:`paged_indexer` selects from.

    Args: as :func:`paged_indexer`.

    Returns:
      float32 ``[B, Q, Hi, max_pages]``: per logical page, the max of
      ``scale * <qi, ki>`` over the page's keys that the query sees; ``-inf``
      where it sees none (holes, future pages, padded queries).
    """
    nq, di = qi.shape[1], qi.shape[3]
    scale = di**-0.5 if scale is None else scale
    q_len, kv_len, ki, stored = _paged_index_keys(qi, ki_cache, page_table, kv_lengths, ki_scale, q_lengths)
    return _map_query_chunks(lambda start, qi_c: _paged_block_max(qi_c, ki, stored, start, q_len, kv_len, scale),
                             [qi.astype(jnp.float32)], nq)


def _paged_index_keys(qi, ki_cache, page_table, kv_lengths, ki_scale, q_lengths):
    """The clamped lengths, the stored index keys in logical order (float32
    ``[B, max_pages * 128, Di]``, 0 where none is stored) and which are stored."""
    bsz, nq, _, di = qi.shape
    max_pages = page_table.shape[1]
    page_table = jnp.asarray(page_table, jnp.int32)
    q_len, kv_len = _paged_lengths(q_lengths, kv_lengths, bsz, nq, max_pages)
    stored, physical = _stored_keys(page_table, ki_cache.shape[0], kv_len)
    ki = _dequantise(ki_cache[physical], ki_scale).reshape(bsz, max_pages * BLOCK_SIZE, di)
    return q_len, kv_len, jnp.where(stored[..., None], ki, 0.0), stored


def _paged_block_max(qi_c, ki, stored, start, q_len, kv_len, scale):
    """Block scores ``[B, C, Hi, max_pages]`` of one query chunk over the stored keys."""
    s = _index_logits(qi_c, ki, start, q_len, kv_len, scale)
    return _block_max(jnp.where(stored[:, None, None, :], s, _NEG_INF))


def indexer_kl_divergence(
    q: Array,
    k: Array,
    qi: Array,
    ki: Array,
    ids: Array,
    *,
    q_lengths: Lengths = None,
    kv_lengths: Lengths = None,
    scale: Optional[float] = None,
    index_scale: Optional[float] = None,
) -> Array:
    """``KL(P_t || P_s)`` of every query and index head (spec 3.8).

    Args:
      q: queries ``[B, Sq, Hq, D]``; k: keys ``[B, Sk, Hkv, D]``.
      qi: index queries ``[B, Sq, Hkv, Di]`` (one index head per KV group);
        ki: index keys ``[B, Sk, Di]``.
      ids: selected blocks ``[B, Sq, Hkv, topk]``: the set ``S`` of query ``i``
        and group ``g`` is the attended set of :func:`sparse_attention`.
      q_lengths, kv_lengths: optional int32 ``[B]`` valid lengths.
      scale: attention scale (default ``D**-0.5``); index_scale: default ``Di**-0.5``.

    Returns:
      float32 ``[B, Sq, Hkv]``: ``KL(P_t || P_s)`` with ``P_t`` the mean over the
      query heads of the group of ``softmax(scale <q, k>)`` on ``S`` (under
      ``stop_gradient``) and ``P_s = softmax(index_scale <qi, ki>)`` on ``S``;
      0 for padded queries and empty sets. Differentiable in ``qi, ki``.
    """
    bsz, sq, _, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    di = qi.shape[-1]
    scale = d**-0.5 if scale is None else scale
    index_scale = di**-0.5 if index_scale is None else index_scale
    q_len = _lengths(q_lengths, bsz, sq)
    kv_len = _lengths(kv_lengths, bsz, sk)
    n_blocks = _cdiv(sk, BLOCK_SIZE)
    usable_blocks = _cdiv(kv_len, BLOCK_SIZE)
    pad = n_blocks * BLOCK_SIZE - sk
    k_blocks = jnp.pad(k.astype(jnp.float32), [(0, 0), (0, pad), (0, 0), (0, 0)])
    k_blocks = jnp.transpose(k_blocks.reshape(bsz, n_blocks, BLOCK_SIZE, hkv, d), (0, 3, 1, 2, 4))
    ki_blocks = jnp.pad(ki.astype(jnp.float32), [(0, 0), (0, pad), (0, 0)])
    ki_blocks = ki_blocks.reshape(bsz, n_blocks, BLOCK_SIZE, di)
    b_idx = jnp.arange(bsz)[:, None, None, None]
    g_idx = jnp.arange(hkv)[None, None, :, None]

    def chunk(start, q_c, qi_c, ids_c):
        c = q_c.shape[1]
        pos, valid = _query_positions(start, c, q_len, kv_len)
        ok = (ids_c >= 0) & (ids_c < usable_blocks[:, None, None, None])
        safe_ids = jnp.where(ok, ids_c, 0).astype(jnp.int32)
        mask = _selected_keys(safe_ids, ok, pos, kv_len, valid)  # [B, C, Hkv, K]
        kc = k_blocks[b_idx, g_idx, safe_ids].reshape(bsz, c, hkv, -1, d)
        kic = ki_blocks[b_idx, safe_ids].reshape(bsz, c, hkv, -1, di)
        teacher, _ = _masked_softmax(_group_logits(q_c, kc, scale), mask[:, :, :, None, :])
        p_t = lax.stop_gradient(jnp.mean(teacher, axis=3))
        z = index_scale * jnp.einsum("bcgd,bcgkd->bcgk", qi_c, kic, precision=PRECISION)
        _, lse_s = _masked_softmax(z, mask)
        log_ps = jnp.where(mask, z - lse_s[..., None], 0.0)
        # Keys with P_t = 0 (masked, or underflow) contribute nothing.
        log_pt = jnp.log(jnp.where(p_t > 0, p_t, 1.0))
        return jnp.sum(jnp.where(p_t > 0, p_t * (log_pt - log_ps), 0.0), axis=-1)

    return _map_query_chunks(chunk, [q.astype(jnp.float32), qi.astype(jnp.float32), ids], sq)


def indexer_kl_loss(
    q: Array,
    k: Array,
    qi: Array,
    ki: Array,
    ids: Array,
    *,
    q_lengths: Lengths = None,
    kv_lengths: Lengths = None,
    scale: Optional[float] = None,
    index_scale: Optional[float] = None,
    coeff: float = 1.0,
) -> Array:
    """The indexer's training loss (spec 3.8): a float32 scalar,
    ``coeff / (Hi * T) * sum`` of :func:`indexer_kl_divergence` with ``T`` the
    number of valid queries (``sum(q_lengths)``). Its gradient flows to
    ``qi, ki`` only; wrt the student logits it is ``coeff/(Hi*T) (P_s - P_t)``.
    """
    kl = indexer_kl_divergence(q, k, qi, ki, ids, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=scale,
                               index_scale=index_scale)
    bsz, sq, hi = kl.shape
    valid_queries = jnp.maximum(jnp.sum(_lengths(q_lengths, bsz, sq)), 1).astype(jnp.float32)
    return coeff / (hi * valid_queries) * jnp.sum(kl)
