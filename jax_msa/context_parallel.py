"""Context (sequence) parallelism for MSA: queries split along a mesh axis.

Every shard holds a slice of the sequence (queries, keys, values, index keys).
The selected blocks of a query can lie anywhere in its past, so each shard
all-gathers the keys, values and index keys, then runs the ops on its own
queries with their *global* positions (bottom-right alignment with the global
lengths, via `shard_lengths`). Autodiff turns the all-gathers into
reduce-scatters: dK, dV and dKi come back split like K, V and Ki.

Causal work grows with the position, so contiguous slices load the last shard
most. The `"zigzag"` layout cuts the sequence into 2n chunks and gives shard s
the chunks s and 2n-1-s (one early, one late), which evens out the visible
pairs (`work_per_shard` measures it). Arrays are then stored in *layout
order*: `to_layout` permutes the model's input tokens once (and positions,
targets); every activation of the model stays in that order, and the
attention ops below know where each token sits.

Two forms:
* per-shard functions (`msa_attention`, `sparse_attention`, `indexer`,
  `dot_product_attention`, `indexer_kl_loss`, `map_query_chunks`) to call
  inside `shard_map` with `axis_name`, for explicit-mesh code;
* `ContextParallel(mesh, axis, ...)`, whose methods take global arrays under
  `jax.jit` and wrap the per-shard functions in `shard_map`.

(Under plain `jax.jit`, the ops themselves also run context-parallel when their
queries are split along the sequence, contiguously: see `_partitioning`.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import jax_msa
from jax_msa import _validation as checks
from jax_msa._partitioning import shard_lengths

LAYOUTS = ("contiguous", "zigzag")
AxisNames = str | tuple[str, ...] | None

try:
    _shard_map = functools.partial(jax.shard_map, check_vma=False)
except AttributeError:  # pragma: no cover - jax versions before jax.shard_map
    from jax.experimental.shard_map import shard_map as _experimental_shard_map

    def _shard_map(f, *, mesh, in_specs, out_specs):
        return _experimental_shard_map(f, mesh, in_specs, out_specs, check_rep=False)


def _chunks_per_shard(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 2 if layout == "zigzag" else 1


def shard_chunks(num_shards: int, layout: str = "zigzag") -> np.ndarray:
    """Global chunk ids held by each shard, in storage order: [num_shards, chunks]."""
    s = np.arange(num_shards)
    if _chunks_per_shard(layout) == 1:
        return s[:, None]
    return np.stack([s, 2 * num_shards - 1 - s], axis=1)


def layout_permutation(seq_len: int, num_shards: int, layout: str = "zigzag") -> np.ndarray:
    """perm [seq_len]: the global token stored at each position of layout order.

    `x_layout = x[:, perm]`; shard s stores positions [s*S/n, (s+1)*S/n)."""
    chunks = shard_chunks(num_shards, layout).reshape(-1)
    if seq_len % len(chunks):
        raise ValueError(f"sequence length {seq_len} must be divisible by {len(chunks)} chunks "
                         f"({layout} layout over {num_shards} shards)")
    size = seq_len // len(chunks)
    return (chunks[:, None] * size + np.arange(size)).reshape(-1)


def to_layout(x: jax.Array, num_shards: int, layout: str = "zigzag", axis: int = 1) -> jax.Array:
    """Permutes the sequence axis of x from natural order into layout order.

    Meant for arrays not yet split along the sequence (the model's input tokens,
    positions and targets): permuting a split sequence moves data between devices."""
    return jnp.take(x, layout_permutation(x.shape[axis], num_shards, layout), axis=axis)


def from_layout(x: jax.Array, num_shards: int, layout: str = "zigzag", axis: int = 1) -> jax.Array:
    """Inverse of `to_layout`."""
    return jnp.take(x, np.argsort(layout_permutation(x.shape[axis], num_shards, layout)), axis=axis)


def work_per_shard(seq_len: int, num_shards: int, layout: str = "zigzag", *, topk: int | None = None,
                   block_size: int = checks.BLOCK_SIZE) -> np.ndarray:
    """Causal attention work of each shard, for a full sequence (Sq = Sk = seq_len).

    Without topk: visible (query, key) pairs (dense attention and the indexer).
    With topk: keys attended by sparse attention, min(position + 1, the keys of
    topk blocks, the local one partial), the MSA attention's work.
    Returns [num_shards] int64.
    """
    position = layout_permutation(seq_len, num_shards, layout).astype(np.int64)
    keys = position + 1
    if topk is not None:
        keys = np.minimum(keys, (topk - 1) * block_size + position % block_size + 1)
    return keys.reshape(num_shards, -1).sum(axis=1)


def _gather(x: jax.Array, axis_name: str, layout: str) -> jax.Array:
    """All-gathers the sequence (axis 1) of a layout-order shard into natural order."""
    x = jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
    if layout == "contiguous":
        return x
    n = jax.lax.axis_size(axis_name)
    b, s = x.shape[:2]
    pairs = x.reshape(b, n, 2, s // (2 * n), *x.shape[2:])  # [B, shard, (early, late), chunk, ...]
    natural = jnp.concatenate([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1)
    return natural.reshape(x.shape)


def map_query_chunks(
    fn: Callable,
    q_side: Sequence[jax.Array],
    kv_side: Sequence[jax.Array],
    *,
    axis_name: str,
    layout: str = "zigzag",
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    causal: bool = True,
) -> list:
    """Runs `fn` on each contiguous chunk of this shard's queries against all keys.

    Call inside shard_map. The building block of the ops below; use it to run
    several ops on one gather of the keys.

    Args:
      fn: fn(q_chunk, kv_full, q_lengths, kv_lengths) -> anything, where q_chunk
        is the list of q_side arrays sliced to one chunk [B, c, ...], kv_full the
        list of kv_side arrays gathered to [B, Sk, ...] in natural order, and the
        lengths [B] place the chunk's queries at their global positions.
      q_side: this shard's query-side arrays [B, Sq/n, ...] (layout order).
      kv_side: this shard's key-side arrays [B, Sk/n, ...] (layout order).
      axis_name: the mesh axis splitting the sequence.
      layout: "zigzag" (2 chunks per shard) or "contiguous" (1).
      q_lengths, kv_lengths: global valid lengths [B] (default: full Sq, Sk).
      causal: False keeps the key lengths (only the query count changes).
    Returns:
      [fn(...) for each local chunk], in storage order.
    """
    chunks = _chunks_per_shard(layout)
    n = jax.lax.axis_size(axis_name)
    batch, local = q_side[0].shape[:2]
    for x in (*q_side, *kv_side):
        if x.shape[1] % chunks:
            raise ValueError(f"a local sequence of {x.shape[1]} tokens does not split into {chunks} chunks "
                             f"({layout} layout); the sequence length must be a multiple of {chunks * n}")
    kv_full = [_gather(x, axis_name, layout) for x in kv_side]
    q_lengths = checks.lengths_or_default(q_lengths, batch, n * local, "q_lengths")
    kv_lengths = checks.lengths_or_default(kv_lengths, batch, kv_full[0].shape[1], "kv_lengths")
    size = local // chunks
    chunk_ids = jnp.asarray(shard_chunks(n, layout))[jax.lax.axis_index(axis_name)]
    results = []
    for i in range(chunks):
        q_chunk = [x[:, i * size:(i + 1) * size] for x in q_side]
        lengths = shard_lengths(q_lengths, kv_lengths, chunk_ids[i] * size, size, causal)
        results.append(fn(q_chunk, kv_full, *lengths))
    return results


def _concat(results: list):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *results)


def msa_attention(q: jax.Array, k: jax.Array, v: jax.Array, qi: jax.Array, ki: jax.Array, *, axis_name: str,
                  layout: str = "zigzag", q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                  return_ids: bool = False, **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`jax_msa.msa_attention` on this shard's queries (call inside shard_map).

    Args:
      q [B, Sq/n, Hq, D], k, v [B, Sk/n, Hkv, D], qi [B, Sq/n, Hkv, Di],
      ki [B, Sk/n, Di]: this shard's slices in layout order.
      axis_name, layout: see `map_query_chunks`.
      q_lengths, kv_lengths: global lengths [B].
      return_ids: also return this shard's ids [B, Sq/n, Hkv, topk] (global block ids).
      **kwargs: topk, scale, index_scale, implementation, as for msa_attention.
    Returns:
      out [B, Sq/n, Hq, D] (and ids).
    """
    def run(qs, kvs, ql, kl):
        return jax_msa.msa_attention(qs[0], kvs[0], kvs[1], qs[1], kvs[2], q_lengths=ql, kv_lengths=kl,
                                     return_ids=return_ids, **kwargs)

    return _concat(map_query_chunks(run, [q, qi], [k, v, ki], axis_name=axis_name, layout=layout,
                                    q_lengths=q_lengths, kv_lengths=kv_lengths))


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array, *, axis_name: str,
                     layout: str = "zigzag", q_lengths: jax.Array | None = None,
                     kv_lengths: jax.Array | None = None, **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`jax_msa.sparse_attention` on this shard's queries (call inside shard_map).

    q [B, Sq/n, Hq, D], ids [B, Sq/n, Hkv, topk] (global block ids), k, v
    [B, Sk/n, Hkv, D]; **kwargs: scale, return_lse, implementation.
    Returns out [B, Sq/n, Hq, D] (and lse [B, Sq/n, Hq])."""
    def run(qs, kvs, ql, kl):
        return jax_msa.sparse_attention(qs[0], kvs[0], kvs[1], qs[1], q_lengths=ql, kv_lengths=kl, **kwargs)

    return _concat(map_query_chunks(run, [q, ids], [k, v], axis_name=axis_name, layout=layout,
                                    q_lengths=q_lengths, kv_lengths=kv_lengths))


def indexer(qi: jax.Array, ki: jax.Array, *, axis_name: str, layout: str = "zigzag",
            q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None,
            **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`jax_msa.indexer` on this shard's queries (call inside shard_map).

    qi [B, Sq/n, Hi, Di], ki [B, Sk/n, Di]; **kwargs: topk, scale, return_lse,
    implementation. Returns ids [B, Sq/n, Hi, topk] (global block ids) and lse."""
    def run(qs, kvs, ql, kl):
        return jax_msa.indexer(qs[0], kvs[0], q_lengths=ql, kv_lengths=kl, **kwargs)

    return _concat(map_query_chunks(run, [qi], [ki], axis_name=axis_name, layout=layout,
                                    q_lengths=q_lengths, kv_lengths=kv_lengths))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, layout: str = "zigzag",
                          causal: bool = True, q_lengths: jax.Array | None = None,
                          kv_lengths: jax.Array | None = None, **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`jax_msa.dot_product_attention` on this shard's queries (call inside shard_map).

    q [B, Sq/n, Hq, D], k, v [B, Sk/n, Hkv, D]; **kwargs: scale, return_lse,
    implementation. Returns out [B, Sq/n, Hq, D] (and lse)."""
    def run(qs, kvs, ql, kl):
        return jax_msa.dot_product_attention(qs[0], kvs[0], kvs[1], causal=causal, q_lengths=ql, kv_lengths=kl,
                                             **kwargs)

    return _concat(map_query_chunks(run, [q], [k, v], axis_name=axis_name, layout=layout, q_lengths=q_lengths,
                                    kv_lengths=kv_lengths, causal=causal))


def weighted_sum(losses_and_counts: Sequence[tuple[jax.Array, jax.Array]], axis_names: AxisNames) -> jax.Array:
    """Combines per-chunk means into the mean over all chunks of all shards.

    losses_and_counts: (mean over a chunk, number of items it averages) pairs;
    axis_names: the mesh axes to sum over (the sequence axis, and the batch
    axes when the batch is split in the same shard_map)."""
    total = sum(jnp.where(count > 0, loss * count, 0.0) for loss, count in losses_and_counts)
    count = sum(count for _, count in losses_and_counts)
    if axis_names:
        total, count = jax.lax.psum((total, count), axis_names)
    return total / jnp.maximum(count, 1)


def indexer_kl_loss(q: jax.Array, k: jax.Array, qi: jax.Array, ki: jax.Array, ids: jax.Array, *, axis_name: str,
                    layout: str = "zigzag", q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                    mean_axes: AxisNames = None, **kwargs) -> jax.Array:
    """`jax_msa.indexer_kl_loss` over the queries of all shards (call inside shard_map).

    q [B, Sq/n, Hq, D], qi [B, Sq/n, Hi, Di], ids [B, Sq/n, Hi, topk] (this
    shard's queries), k [B, Sk/n, Hkv, D], ki [B, Sk/n, Di]. The per-chunk
    losses are weighted by their valid queries and combined over `mean_axes`
    (default `axis_name`; add the axes splitting the batch or the heads in the
    same shard_map), so every shard returns the loss of the whole problem.
    **kwargs: scale, index_scale, coeff.
    """
    def run(qs, kvs, ql, kl):
        loss = jax_msa.indexer_kl_loss(qs[0], kvs[0], qs[1], kvs[1], qs[2], q_lengths=ql, kv_lengths=kl, **kwargs)
        return loss, jnp.sum(ql)

    chunks = map_query_chunks(run, [q, qi, ids], [k, ki], axis_name=axis_name, layout=layout,
                              q_lengths=q_lengths, kv_lengths=kv_lengths)
    return weighted_sum(chunks, axis_name if mean_axes is None else mean_axes)


def _as_tuple(axes: AxisNames) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Context-parallel ops on global arrays under jax.jit, via shard_map.

    Arrays are in layout order (`to_layout`) with the sequence split along
    `axis`, the batch along `batch_axes` and the heads along `head_axes` (query,
    KV and index heads alike, so each must divide). Lengths are global [B].
    Name every mesh axis in one of the three: over an axis named nowhere the
    inputs are replicated, and the backward all-reduces their gradients.

    Attributes:
      mesh: the device mesh.
      axis: mesh axis splitting the sequence.
      batch_axes: mesh axes splitting the batch (data parallelism), or None.
      head_axes: mesh axes splitting the heads (tensor parallelism), or None.
      layout: "zigzag" (balanced causal work) or "contiguous".
    """

    mesh: Mesh
    axis: str
    batch_axes: AxisNames = None
    head_axes: AxisNames = None
    layout: str = "zigzag"

    def __post_init__(self):
        _chunks_per_shard(self.layout)

    @property
    def num_shards(self) -> int:
        """Shards along the sequence."""
        return self.mesh.shape[self.axis]

    @property
    def mean_axes(self) -> tuple[str, ...]:
        """Mesh axes whose shards hold different queries or heads: a mean over
        queries and heads (a loss) is combined over them (`weighted_sum`)."""
        return (self.axis, *_as_tuple(self.batch_axes), *_as_tuple(self.head_axes))

    def spec(self, labels: str) -> PartitionSpec:
        """PartitionSpec of an array whose dims have these roles: b batch, q/k
        sequence, h/g heads, anything else whole (as in `_partitioning`)."""
        axes = {"b": self.batch_axes, "q": self.axis, "k": self.axis, "h": self.head_axes, "g": self.head_axes}
        return PartitionSpec(*(axes.get(label) for label in labels))

    def shard_map(self, fn: Callable, in_labels: Sequence[str], out_labels) -> Callable:
        """shard_map of fn over the mesh, with specs from dimension roles (`spec`);
        out_labels is a string or a pytree of strings like fn's results.

        On a mesh with Explicit axes (`jax.make_mesh`'s default) the inputs are
        first resharded to their specs, as shard_map there requires."""
        in_specs = tuple(map(self.spec, in_labels))
        mapped = _shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=jax.tree.map(self.spec, out_labels))
        if AxisType.Explicit not in getattr(self.mesh, "axis_types", ()):
            return mapped

        def resharded(*args):
            return mapped(*(jax.sharding.reshard(x, NamedSharding(self.mesh, spec)) for x, spec in zip(args, in_specs)))
        return resharded

    def _lengths(self, q_lengths, kv_lengths, batch: int, sq: int, sk: int):
        return (checks.lengths_or_default(q_lengths, batch, sq, "q_lengths"),
                checks.lengths_or_default(kv_lengths, batch, sk, "kv_lengths"))

    def msa_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, qi: jax.Array, ki: jax.Array, *,
                      q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                      return_ids: bool = False, **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Context-parallel `jax_msa.msa_attention`; shapes as there (global, layout order)."""
        lengths = self._lengths(q_lengths, kv_lengths, q.shape[0], q.shape[1], k.shape[1])
        fn = functools.partial(self._local(msa_attention), return_ids=return_ids, **kwargs)
        out_labels = ("bqhd", "bqgt") if return_ids else "bqhd"
        return self.shard_map(fn, ("bqhd", "bkgd", "bkgd", "bqgd", "bkd", "b", "b"), out_labels)(
            q, k, v, qi, ki, *lengths)

    def sparse_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array, *,
                         q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                         return_lse: bool = False, **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Context-parallel `jax_msa.sparse_attention`; shapes as there (global, layout order)."""
        lengths = self._lengths(q_lengths, kv_lengths, q.shape[0], q.shape[1], k.shape[1])
        fn = functools.partial(self._local(sparse_attention), return_lse=return_lse, **kwargs)
        out_labels = ("bqhd", "bqh") if return_lse else "bqhd"
        return self.shard_map(fn, ("bqhd", "bkgd", "bkgd", "bqgt", "b", "b"), out_labels)(q, k, v, ids, *lengths)

    def indexer(self, qi: jax.Array, ki: jax.Array, *, q_lengths: jax.Array | None = None,
                kv_lengths: jax.Array | None = None, return_lse: bool = False,
                **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Context-parallel `jax_msa.indexer`; shapes as there (global, layout order)."""
        lengths = self._lengths(q_lengths, kv_lengths, qi.shape[0], qi.shape[1], ki.shape[1])
        fn = functools.partial(self._local(indexer), return_lse=return_lse, **kwargs)
        out_labels = ("bqht", "bqh") if return_lse else "bqht"
        return self.shard_map(fn, ("bqhd", "bkd", "b", "b"), out_labels)(qi, ki, *lengths)

    def dot_product_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                              q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                              return_lse: bool = False, **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Context-parallel `jax_msa.dot_product_attention`; shapes as there (global, layout order)."""
        lengths = self._lengths(q_lengths, kv_lengths, q.shape[0], q.shape[1], k.shape[1])
        fn = functools.partial(self._local(dot_product_attention), causal=causal, return_lse=return_lse, **kwargs)
        out_labels = ("bqhd", "bqh") if return_lse else "bqhd"
        return self.shard_map(fn, ("bqhd", "bkgd", "bkgd", "b", "b"), out_labels)(q, k, v, *lengths)

    def indexer_kl_loss(self, q: jax.Array, k: jax.Array, qi: jax.Array, ki: jax.Array, ids: jax.Array, *,
                        q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                        **kwargs) -> jax.Array:
        """Context-parallel `jax_msa.indexer_kl_loss`; shapes as there (global, layout order)."""
        lengths = self._lengths(q_lengths, kv_lengths, q.shape[0], q.shape[1], k.shape[1])
        fn = functools.partial(self._local(indexer_kl_loss), mean_axes=self.mean_axes, **kwargs)
        return self.shard_map(fn, ("bqhd", "bkgd", "bqgd", "bkd", "bqgt", "b", "b"), "")(q, k, qi, ki, ids, *lengths)

    def _local(self, op: Callable) -> Callable:
        """A per-shard op taking (arrays..., q_lengths, kv_lengths) positionally."""
        def call(*args, **kwargs):
            *arrays, q_lengths, kv_lengths = args
            return op(*arrays, axis_name=self.axis, layout=self.layout, q_lengths=q_lengths,
                      kv_lengths=kv_lengths, **kwargs)
        return call
