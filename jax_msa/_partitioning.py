"""Sharding rules for every jax_msa primitive: one generic mechanism.

An opaque custom call under `jax.jit` on several devices would be replicated by
XLA: every sharded input silently all-gathered. Instead, each primitive states
the *role* of every dimension of its operands and results in a layout string,
e.g. sparse attention's forward

    "bqhd,bkgd,bkgd,bqgt,b,b->bqhd,bqh"

with one letter per dimension:
  b  batch                       split freely over mesh axes
  q  query sequence              split: context parallelism (see below)
  k  key sequence                whole on every shard (keys are all-gathered)
  h  query or index heads        split freely (tensor parallelism)
  g  KV heads (GQA groups)       split like `h` when divisible, else whole (MQA)
  any other letter               whole (head dim, blocks, top-k slots)
From it `lower_partitioned` builds a `custom_partitioning` call (with a Shardy
`sharding_rule`, and the GSPMD callbacks for older setups) whose partition
callback plans the per-shard computation from the sharding of operand 0:

* batch- and head-split inputs run the kernel on the local shard, with no
  collective. Heads keep their GQA grouping: `h` and `g` split by the same
  mesh axes (or, with one KV head, `g` stays whole: MQA).
* a split `q` dim is context parallelism: every shard runs its slice of queries
  against all keys, and the query and key lengths (the last two operands of
  any layout with a `q`) are rewritten so that the shard's queries keep their
  global positions (`shard_lengths`).
* a result is a sum over the splits it does not carry (dK and dV sum over
  queries and the heads of a group, a loss over everything): without a `q` dim
  it is reduce-scattered along its `k` dim (all-reduced if it has none) over
  the sequence axes; without a split head dim it is all-reduced over the head
  axes.
* any other split (a head dim, heads that do not divide, an operand split
  unlike operand 0) is resharded to what the kernel needs, with a
  `ShardingWarning` naming the operand and the dimension. Turn it into an
  error with `warnings.filterwarnings("error", category=jax_msa.ShardingWarning)`.
  A primitive without a layout runs whole on every device, likewise.

The lowering takes this route only where XLA will partition the call (a jit
over more than one device, outside shard_map); a single device, and the body
of shard_map or of the partition itself, lower the kernel directly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

try:  # Lets a lowering rule learn the devices (custom_partitioning needs them).
    from jax._src.dispatch import prim_requires_devices_during_lowering as _NEEDS_DEVICES
except ImportError:  # pragma: no cover - later jax versions
    _NEEDS_DEVICES = None

_ROLE_NAMES = {"b": "batch", "q": "query sequence", "k": "key sequence", "h": "heads", "g": "kv heads"}
_WHOLE_NAMES = {"d": "head dim", "n": "blocks", "t": "top-k slots"}


class ShardingWarning(UserWarning):
    """A jax_msa op reshards an input because the kernel cannot use its sharding."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Dimension roles of a primitive's operands and results (module docstring)."""

    operands: tuple[str, ...]
    results: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Layout":
        operands, results = (tuple(part.split(",")) for part in text.replace(" ", "").split("->"))
        if "q" in "".join(operands) and operands[-2:] != ("b", "b"):
            raise ValueError(f"layout {text!r}: an op with queries takes (q_lengths, kv_lengths) last")
        return cls(operands, results)


def register(prim: Primitive) -> None:
    """Makes jit hand the device assignment to `prim`'s lowering, as for custom_partitioning."""
    if _NEEDS_DEVICES is not None:
        _NEEDS_DEVICES.add(prim)


def is_partitioned(ctx) -> bool:
    """Whether XLA's SPMD partitioner will split this call (jit over several devices).

    Manual contexts (shard_map bodies, partition callbacks) have no `num_devices`."""
    return getattr(ctx.module_context.axis_context, "num_devices", 1) > 1


def shard_lengths(q_lengths: jax.Array, kv_lengths: jax.Array, offset: jax.Array | int, size: int,
                  causal: bool = True) -> tuple[jax.Array, jax.Array]:
    """Lengths for a slice of `size` queries starting at global query `offset`.

    Bottom-right alignment puts global query i at kv_lengths - q_lengths + i.
    Local query i is global query offset + i; with the returned lengths it sits
    at kv_local - q_local + i, the same position, and rows past q_lengths stay
    padded. Without causality only the query count changes.

    Args:
      q_lengths, kv_lengths: global valid lengths [B] int32.
      offset: global index of the slice's first query (may be traced).
      size: queries in the slice.
    Returns:
      (q_local [B], kv_local [B]) int32, with q_local <= size and kv_local <= kv_lengths.
    """
    q_local = jnp.clip(q_lengths - offset, 0, size)
    if not causal:
        return q_local, kv_lengths
    return q_local, jnp.minimum(kv_lengths - q_lengths + offset + q_local, kv_lengths)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec_axes(sharding, ndim: int) -> list[tuple[str, ...]]:
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    return [_axes(e) for e in spec] + [()] * (ndim - len(spec))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Mesh axes splitting each role; `g` follows `heads` only if `split_groups`."""

    batch: tuple[str, ...] = ()
    seq: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    split_groups: bool = False

    def axes(self, label: str) -> tuple[str, ...]:
        return {"b": self.batch, "q": self.seq, "h": self.heads,
                "g": self.heads if self.split_groups else ()}.get(label, ())

    def sharding(self, mesh, labels: str) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*(self.axes(l) or None for l in labels)))


def _sizes(layout: Layout, shapes: Sequence[Sequence[int]], label: str) -> set[int]:
    return {shape[i] for labels, shape in zip(layout.operands, shapes) for i, l in enumerate(labels) if l == label}


def _plan(name: str, mesh, layout: Layout, shapes, specs) -> _Plan:
    """What to split, read from operand 0; roles whose sizes do not divide stay whole."""
    first, spec = layout.operands[0], specs[0]
    axes = {l: spec[i] for i, l in enumerate(first) if l in "bqh"}
    count = lambda ax: math.prod(mesh.shape[a] for a in ax)
    kept = {}
    for label, ax in axes.items():
        sizes = _sizes(layout, shapes, label)
        if label == "q" and any("q" not in labels for labels in layout.results):
            sizes |= _sizes(layout, shapes, "k")  # key-side results are scattered like the queries
        if ax and all(size % count(ax) == 0 for size in sizes):
            kept[label] = ax
        elif ax:
            _warn(f"{name}: operand 0 [{first}] splits its {_ROLE_NAMES[label]} dimension over mesh axes {ax}, "
                  f"which do not divide every size {sorted(sizes)} it must split; the op all-gathers it")
    heads = kept.get("h", ())
    groups = _sizes(layout, shapes, "g")
    split_groups = bool(heads) and all(g % count(heads) == 0 for g in groups)
    if heads and not split_groups and groups != {1}:
        _warn(f"{name}: heads are split over mesh axes {heads} but the kv head counts {sorted(groups)} are "
              "neither divisible by that split nor 1; the op all-gathers the heads")
        heads = ()
    return _Plan(batch=kept.get("b", ()), seq=kept.get("q", ()), heads=heads, split_groups=split_groups)


def _warn(message: str) -> None:
    warnings.warn(f"jax_msa: {message}", ShardingWarning, stacklevel=2)


def _check_operands(name: str, layout: Layout, plan: _Plan, specs) -> None:
    """Warns about every operand split in a way the plan gathers (keys excepted)."""
    for index, (labels, spec) in enumerate(zip(layout.operands, specs)):
        for dim, (label, axes) in enumerate(zip(labels, spec)):
            lost = [a for a in axes if a not in plan.axes(label)]
            if lost and label != "k" and not (index == 0 and label in "bqh"):
                role = _ROLE_NAMES.get(label) or _WHOLE_NAMES.get(label, "a dimension kept whole")
                _warn(f"{name}: operand {index} [{labels}] dimension {dim} ({role}) is split over mesh axes "
                      f"{tuple(lost)}, which the kernel cannot use there; the op all-gathers it. Split batch, "
                      "heads or (for attention) the query sequence instead.")


def _shardy_rule(layout: Layout) -> str:
    """The layout as a Shardy rule. A dimension that must stay whole is a factor
    of its own, so that no split propagates through it. Query and KV heads are
    separate factors: as a compound (kv heads, group size) Shardy would split a
    mesh axis into sub-axes, which the partition callback cannot read."""
    def factor(label, value, dim):
        return label if label in _ROLE_NAMES else f"x{value}_{dim}"

    values = (*layout.operands, *layout.results)
    written = [" ".join(factor(l, v, d) for d, l in enumerate(labels)) for v, labels in enumerate(values)]
    return ", ".join(written[:len(layout.operands)]) + " -> " + ", ".join(written[len(layout.operands):])


def lower_partitioned(prim: Primitive, layout: Layout | None, ctx, *args, **params):
    """Lowers `prim` through custom_partitioning, split as `layout` allows.

    A primitive without a layout is computed whole on every device (its split
    inputs gathered, with a ShardingWarning)."""
    shapes = [aval.shape for aval in ctx.avals_in]
    n_results = len(ctx.avals_out)
    if layout is None:
        layout = Layout(tuple("." * len(s) for s in shapes), tuple("." * len(a.shape) for a in ctx.avals_out))
    layout = Layout(layout.operands, layout.results[:n_results])
    name = prim.name

    def partition(mesh, arg_shapes, result_shape):
        if mesh.empty:
            raise ValueError(f"jax_msa: {name} is split over devices without a jax.sharding.Mesh to read the "
                             "split from; place its inputs with NamedSharding")
        specs = [_spec_axes(a.sharding, len(a.shape)) for a in arg_shapes]
        plan = _plan(name, mesh, layout, shapes, specs)
        _check_operands(name, layout, plan, specs)
        result_shardings = tuple(_result_sharding(plan, mesh, labels) for labels in layout.results)
        arg_shardings = tuple(plan.sharding(mesh, labels) for labels in layout.operands)
        return mesh, _local_computation(prim, layout, plan, params), result_shardings, arg_shardings

    def infer(mesh, arg_shapes, result_shape):
        specs = [_spec_axes(a.sharding, len(a.shape)) for a in arg_shapes]
        with warnings.catch_warnings():  # warned once, by `partition`
            warnings.simplefilter("ignore", ShardingWarning)
            plan = _plan(name, mesh, layout, shapes, specs)
        return tuple(_result_sharding(plan, mesh, labels) for labels in layout.results)

    call = custom_partitioning(lambda *xs: tuple(prim.bind(*xs, **params)))
    call.def_partition(partition, infer_sharding_from_operands=infer, propagate_user_sharding=None,
                       sharding_rule=_shardy_rule(layout))
    return mlir.lower_fun(lambda *xs: list(call(*xs)), multiple_results=True)(ctx, *args)


def _result_sharding(plan: _Plan, mesh, labels: str) -> NamedSharding:
    # A key-side result (no `q`) is reduce-scattered over the sequence axes.
    if "q" not in labels and plan.seq:
        return NamedSharding(mesh, PartitionSpec(*((plan.axes(l) or None) if l != "k" else plan.seq
                                                   for l in labels)))
    return plan.sharding(mesh, labels)


def _sums_over_heads(plan: _Plan, labels: str) -> bool:
    return bool(plan.heads) and not any(plan.axes(l) == plan.heads for l in labels if l in "hg")


def _local_computation(prim: Primitive, layout: Layout, plan: _Plan, params):
    """The per-shard body: global positions for a query slice, sums over split queries/heads."""
    q_dim = layout.operands[0].find("q")

    def local(*args):
        args = list(args)
        if plan.seq:
            size = args[0].shape[q_dim]
            offset = jax.lax.axis_index(plan.seq) * size
            args[-2:] = shard_lengths(args[-2], args[-1], offset, size, causal=params.get("causal", True))
        results = prim.bind(*args, **params)
        out = []
        for labels, result in zip(layout.results, results):
            if _sums_over_heads(plan, labels):
                result = jax.lax.psum(result, plan.heads)
            if "q" not in labels and plan.seq:
                result = (jax.lax.psum_scatter(result, plan.seq, scatter_dimension=labels.index("k"), tiled=True)
                          if "k" in labels else jax.lax.psum(result, plan.seq))
            out.append(result)
        return tuple(out)

    return local
