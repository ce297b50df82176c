"""The whole MSA layer's attention (spec §3.5): indexer, then sparse attention."""

from __future__ import annotations

import jax

from jax_msa import _validation as checks
from jax_msa.indexer import indexer
from jax_msa.sparse_attention import sparse_attention


def msa_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    qi: jax.Array,
    ki: jax.Array,
    *,
    topk: int = 16,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    index_scale: float | None = None,
    return_ids: bool = False,
    implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MiniMax Sparse Attention: select top-k blocks with the indexer, attend to them.

    Args:
      q: queries [B, Sq, Hq, D]; k, v: keys/values [B, Sk, Hkv, D].
      qi: index queries [B, Sq, Hkv, Di] (one index head per KV group);
      ki: shared index keys [B, Sk, Di].
      topk: blocks per query (local block included), 1..64.
      q_lengths, kv_lengths: valid lengths [B], bottom-right aligned.
      scale: attention scale (default D**-0.5); index_scale: default Di**-0.5.
      return_ids: also return the selected ids [B, Sq, Hkv, topk].
      implementation: "auto" | "kernel" | "reference", for both stages.
    Returns:
      out [B, Sq, Hq, D] in q's dtype, and the ids if asked. Gradients flow to
      q, k, v only (the selection is under stop_gradient).
    """
    checks.check_rank(q, 4, "q", "[B, Sq, Hq, D]")
    checks.check_rank(k, 4, "k", "[B, Sk, Hkv, D]")
    checks.check_rank(qi, 4, "qi", "[B, Sq, Hi, Di]")
    if qi.shape[2] != k.shape[2]:
        raise ValueError(f"qi has {qi.shape[2]} index heads but k has {k.shape[2]} kv heads; "
                         "MSA uses one index head per KV group")
    ids = indexer(jax.lax.stop_gradient(qi), jax.lax.stop_gradient(ki), topk=topk, q_lengths=q_lengths,
                  kv_lengths=kv_lengths, scale=index_scale, implementation=implementation)
    out = sparse_attention(q, k, v, ids, q_lengths=q_lengths, kv_lengths=kv_lengths, scale=scale,
                           implementation=implementation)
    return (out, ids) if return_ids else out
