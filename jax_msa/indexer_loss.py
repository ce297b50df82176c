"""The indexer's training loss (spec §3.8): KL from the attention it steers.

Primitive:
  jax_msa_indexer_kl_loss(q, k, qi, ki, ids, q_lengths, kv_lengths; scale, index_scale, with_grads)
      -> kl [B][, dqi, dki]
kl[b] is KL(P_t || P_s) summed over the valid queries and index heads of row b.
With with_grads the kernel also returns the gradients of sum(kl) wrt qi and
ki, computed in the same pass as the loss; a custom_vjp scales them by the
cotangent. q and k get no gradient (the teacher is a constant), nor do ids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jax_msa import _validation as checks
from jax_msa import reference
from jax_msa._primitives import define_primitive
from jax_msa.paged import check_ids, check_lengths

_LAYOUT = "q [B, Sq, Hq, D], k [B, Sk, Hkv, D], qi [B, Sq, Hkv, Di], ki [B, Sk, Di]"


def _abstract(q, k, qi, ki, ids, q_lengths, kv_lengths, *, scale, index_scale, with_grads):
    kl = ShapedArray(q.shape[:1], jnp.float32)
    return [kl, ShapedArray(qi.shape, qi.dtype), ShapedArray(ki.shape, ki.dtype)] if with_grads else [kl]


def _reference(q, k, qi, ki, ids, q_lengths, kv_lengths, *, scale, index_scale, with_grads):
    def kl_rows(qi, ki):
        kl = reference.indexer_kl_divergence(q, k, qi, ki, ids, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                             scale=float(scale), index_scale=float(index_scale))
        return jnp.sum(kl, axis=(1, 2))

    if not with_grads:
        return [kl_rows(qi, ki)]
    kl, pullback = jax.vjp(kl_rows, qi, ki)
    return [kl, *pullback(jnp.ones_like(kl))]


_kl_p = define_primitive("indexer_kl_loss", abstract_eval=_abstract, reference=_reference,
                         ffi_attributes=("scale", "index_scale"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _kl_rows(q, k, qi, ki, ids, q_lengths, kv_lengths, scale, index_scale, implementation):
    (kl,) = _kl_p.bind(q, k, qi, ki, ids, q_lengths, kv_lengths, scale=scale, index_scale=index_scale,
                       with_grads=False, implementation=implementation)
    return kl


def _kl_rows_fwd(q, k, qi, ki, ids, q_lengths, kv_lengths, scale, index_scale, implementation):
    kl, dqi, dki = _kl_p.bind(q, k, qi, ki, ids, q_lengths, kv_lengths, scale=scale, index_scale=index_scale,
                              with_grads=True, implementation=implementation)
    return kl, (dqi, dki)


def _kl_rows_bwd(scale, index_scale, implementation, residuals, g):
    dqi, dki = residuals
    dqi = (dqi.astype(jnp.float32) * g[:, None, None, None]).astype(dqi.dtype)
    dki = (dki.astype(jnp.float32) * g[:, None, None]).astype(dki.dtype)
    return None, None, dqi, dki, None, None, None


_kl_rows.defvjp(_kl_rows_fwd, _kl_rows_bwd)


def indexer_kl_loss(
    q: jax.Array,
    k: jax.Array,
    qi: jax.Array,
    ki: jax.Array,
    ids: jax.Array,
    *,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    index_scale: float | None = None,
    coeff: float = 1.0,
    implementation: str = "auto",
) -> jax.Array:
    """KL loss that trains the indexer to predict where the attention goes (spec §3.8).

    For each valid query i and KV group g, over the attended set S of
    `sparse_attention` with these ids: the teacher P_t is the mean over the
    query heads of g of softmax(scale <q, k>) on S, the student P_s is
    softmax(index_scale <qi[i, g], ki>) on S, and
    loss = coeff / (Hkv * T) * sum_{i, g} KL(P_t || P_s), T = sum(q_lengths).

    Args:
      q: queries [B, Sq, Hq, D]; k: keys [B, Sk, Hkv, D] (one float dtype).
      qi: index queries [B, Sq, Hkv, Di] (one index head per KV group);
        ki: index keys [B, Sk, Di] (one float dtype, may differ from q's).
      ids: selected blocks [B, Sq, Hkv, topk] int32 (e.g. from `indexer`);
        -1 and out-of-range ids are skipped.
      q_lengths, kv_lengths: valid lengths [B] (default Sq, Sk), bottom-right aligned.
      scale: attention scale, default D**-0.5; index_scale: default Di**-0.5.
      coeff: loss weight.
      implementation: "auto" | "kernel" | "reference".
    Returns:
      The loss, a float32 scalar. Differentiable in qi and ki only: q and k
      (the teacher) get zero gradients. Gradient wrt the student logits:
      coeff / (Hkv * T) * (P_s - P_t).
    """
    checks.check_implementation(implementation)
    for name, x, rank in (("q", q, 4), ("k", k, 4), ("qi", qi, 4), ("ki", ki, 3)):
        checks.check_rank(x, rank, name, _LAYOUT)
    b, sq, hq, d = q.shape
    sk, hkv, di = k.shape[1], k.shape[2], qi.shape[3]
    checks.check_shape(k, (b, sk, hkv, d), "k", _LAYOUT)
    if qi.shape[2] != hkv:
        raise ValueError(f"qi has {qi.shape[2]} index heads but k has {hkv} kv heads; "
                         "the loss needs one index head per KV group")
    checks.check_shape(qi, (b, sq, hkv, di), "qi", _LAYOUT)
    checks.check_shape(ki, (b, sk, di), "ki", _LAYOUT)
    checks.check_float_dtypes(q=q, k=k)
    checks.check_float_dtypes(qi=qi, ki=ki)
    checks.check_head_dim(d, "q")
    checks.check_head_dim(di, "qi")
    checks.check_gqa(hq, hkv)
    ids = check_ids(ids, (b, sq, hkv), checks.num_blocks(sk))
    q_lengths, kv_lengths = check_lengths(q_lengths, kv_lengths, b, sq, sk)
    scale = checks.resolve_scale(scale, d)
    index_scale = checks.resolve_scale(index_scale, di)
    if implementation == "reference":
        return reference.indexer_kl_loss(q, k, qi, ki, ids, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=scale,
                                         index_scale=index_scale, coeff=coeff)
    kl = _kl_rows(q, k, qi, ki, ids, q_lengths, kv_lengths, np.float32(scale), np.float32(index_scale),
                  implementation)
    valid_queries = jnp.maximum(jnp.sum(q_lengths), 1).astype(jnp.float32)
    return coeff / (hkv * valid_queries) * jnp.sum(kl)
