"""Flax (NNX) modules for MiniMax Sparse Attention. Needs `pip install flax`.

`MSAAttention` is the attention block of an MSA transformer layer: query, key,
value and output projections with GQA, one index-query head per KV group and
one shared index-key head, rotary position embeddings on all four, and the
indexer trained by `jax_msa.indexer_kl_loss` (its gradient reaches only the
index projections; the attention's own loss never does, as the selection is
under stop_gradient). `attention="dense"` switches to dense attention (warm-up,
or the dense layers of a hybrid model) while still training the indexer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_msa
from jax_msa import context_parallel as cp

ATTENTION_KINDS = ("msa", "dense")


def _check_attention(kind: str) -> None:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding over the last dim (its two halves rotate together).

    Args:
      x: [B, S, ..., D] with D even.
      positions: [B, S] integer positions of the tokens.
      base: wavelength base.
    Returns:
      x rotated, same shape and dtype.
    """
    half = x.shape[-1] // 2
    freq = base ** (-np.arange(half, dtype=np.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, S, half]
    angle = angle.reshape(*angle.shape[:2], *(1,) * (x.ndim - 3), half)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MSAAttention(nnx.Module):
    """MSA attention block: [B, S, E] -> ([B, S, E], indexer loss).

    Attributes set at construction may be changed afterwards (e.g.
    `block.attention = "msa"` after a dense warm-up); jit retraces.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        index_head_dim: int = 64,
        topk: int = 16,
        attention: str = "msa",
        train_indexer: bool = True,
        indexer_loss_coeff: float = 1.0,
        rope_base: float = 10000.0,
        context_parallel: cp.ContextParallel | None = None,
        implementation: str = "auto",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """
        Args:
          embed_dim: model width E.
          num_heads, num_kv_heads, head_dim: query heads Hq, KV heads Hkv
            (Hq a multiple of Hkv), head dim D.
          index_head_dim: Di of the Hkv index-query heads and the shared index key.
          topk: blocks of 128 keys each query attends to (local block included).
          attention: "msa" (indexer + sparse attention) or "dense".
          train_indexer: compute the indexer's KL loss (also in dense mode).
          indexer_loss_coeff: the loss's `coeff`.
          rope_base: RoPE wavelength base.
          context_parallel: run the attention context-parallel on this mesh
            (inputs then in its layout order, see `jax_msa.context_parallel`).
          implementation: passed to the jax_msa ops.
          dtype: compute dtype of the projections and attention.
          param_dtype: dtype of the weights.
          rngs: initialisation keys.
        """
        _check_attention(attention)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(embed_dim, num_heads * head_dim)
        self.k_proj = linear(embed_dim, num_kv_heads * head_dim)
        self.v_proj = linear(embed_dim, num_kv_heads * head_dim)
        self.o_proj = linear(num_heads * head_dim, embed_dim)
        self.index_q_proj = linear(embed_dim, num_kv_heads * index_head_dim)
        self.index_k_proj = linear(embed_dim, index_head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.index_head_dim = index_head_dim
        self.topk, self.attention, self.train_indexer = topk, attention, train_indexer
        self.indexer_loss_coeff, self.rope_base = indexer_loss_coeff, rope_base
        self.context_parallel, self.implementation = context_parallel, implementation

    def __call__(self, x: jax.Array, positions: jax.Array | None = None, *,
                 lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """
        Args:
          x: [B, S, E] token activations (in layout order under context parallelism).
          positions: [B, S] token positions for RoPE; default 0..S-1 (permuted to
            the layout order under context parallelism).
          lengths: [B] valid tokens per row (the rest is padding); default S.
        Returns:
          (y [B, S, E], indexer loss: scalar float32, 0 when not trained).
        """
        _check_attention(self.attention)  # may have been switched since construction
        b, s, _ = x.shape
        if positions is None:
            order = (np.arange(s) if self.context_parallel is None else
                     cp.layout_permutation(s, self.context_parallel.num_shards, self.context_parallel.layout))
            positions = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (b, s))
        lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        split = lambda t, h: t.reshape(b, s, h, -1)
        q = rope(split(self.q_proj(x), self.num_heads), positions, self.rope_base)
        k = rope(split(self.k_proj(x), self.num_kv_heads), positions, self.rope_base)
        v = split(self.v_proj(x), self.num_kv_heads)
        qi = rope(split(self.index_q_proj(x), self.num_kv_heads), positions, self.rope_base)
        ki = rope(self.index_k_proj(x), positions, self.rope_base)
        if self.context_parallel is None:
            out, loss = self._attend(q, k, v, qi, ki, lengths, lengths)
        else:
            par = self.context_parallel
            out, loss = par.shard_map(self._attend_shard, ("bqhd", "bkgd", "bkgd", "bqgd", "bkd", "b", "b"),
                                      ("bqhd", ""))(q, k, v, qi, ki, lengths, lengths)
        return self.o_proj(out.reshape(b, s, -1)), loss

    def _attend(self, q, k, v, qi, ki, q_lengths, kv_lengths) -> tuple[jax.Array, jax.Array]:
        """Attention and the indexer loss on whole sequences (or one context-parallel chunk)."""
        common = dict(q_lengths=q_lengths, kv_lengths=kv_lengths, implementation=self.implementation)
        if self.attention == "msa":
            out, ids = jax_msa.msa_attention(q, k, v, qi, ki, topk=self.topk, return_ids=True, **common)
        else:
            out = jax_msa.dot_product_attention(q, k, v, causal=True, **common)
            ids = None
        if not self.train_indexer:
            return out, jnp.zeros((), jnp.float32)
        if ids is None:
            ids = jax_msa.indexer(jax.lax.stop_gradient(qi), jax.lax.stop_gradient(ki), topk=self.topk, **common)
        loss = jax_msa.indexer_kl_loss(q, k, qi, ki, ids, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                       coeff=self.indexer_loss_coeff, implementation=self.implementation)
        return out, loss

    def _attend_shard(self, q, k, v, qi, ki, q_lengths, kv_lengths) -> tuple[jax.Array, jax.Array]:
        """`_attend` on this shard's queries inside shard_map (one gather of k, v, ki)."""
        par = self.context_parallel

        def chunk(qs, kvs, ql, kl):
            out, loss = self._attend(qs[0], kvs[0], kvs[1], qs[1], kvs[2], ql, kl)
            return out, (loss, jnp.sum(ql))

        chunks = cp.map_query_chunks(chunk, [q, qi], [k, v, ki], axis_name=par.axis, layout=par.layout,
                                     q_lengths=q_lengths, kv_lengths=kv_lengths)
        out = jnp.concatenate([c[0] for c in chunks], axis=1)
        return out, cp.weighted_sum([c[1] for c in chunks], par.mean_axes)
