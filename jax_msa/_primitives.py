"""One place that turns an op description into a JAX primitive.

Every jax_msa primitive has the same parts, side by side: abstract evaluation
(the shape rule), a lowering per platform to its XLA FFI custom call (or, where
the build has no kernel for that platform, to the pure-JAX reference, unless
`implementation="kernel"` was asked for), a vmap rule, and sharding rules (from
a layout string, see `_partitioning`). All operands and results carry the batch
dimension first, so vmap folds its axis into it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_msa import _ffi, _partitioning

try:  # The eager path: run a primitive by compiling it alone.
    from jax._src.dispatch import apply_primitive as _apply_primitive
except ImportError:  # pragma: no cover - later jax versions
    _apply_primitive = None

LOWERING_PLATFORMS = ("cpu", "cuda")


class NoKernelError(NotImplementedError):
    """implementation="kernel" was asked for where no kernel exists."""


def cuda_only(target: str) -> Callable:
    """The `reference` of a hidden primitive that only exists on CUDA: it raises."""
    def reference(*args, **params):
        raise NotImplementedError(f"{target} has no reference: it exists only on CUDA")
    return reference


def define_primitive(
    name: str,
    *,
    abstract_eval: Callable[..., Sequence[jax.core.ShapedArray]],
    reference: Callable[..., Sequence[jax.Array]],
    ffi_attributes: Sequence[str],
    sharding: str | None = None,
    shared_operands: int = 0,
    kernel_takes: dict[str, Callable[..., bool]] | None = None,
    kernel_lowering: dict[str, Callable[..., Sequence[jax.Array]]] | None = None,
    portable_cuda_targets: Sequence[str] = (),
) -> Primitive:
    """Creates primitive `jax_msa_<name>` lowering to FFI target of that name.

    abstract_eval(*avals, **params) -> result avals.
    reference(*operands, **params) -> results: the pure-JAX fallback.
    ffi_attributes: the params passed to the kernel as FFI attributes; every
    primitive also takes the param `implementation`.
    sharding: the role of each dimension, e.g. "bqhd,bkgd->bqhd" (see
    `_partitioning`); without it a jit over several devices runs the op whole.
    shared_operands: how many leading operands have no batch axis (paged
    caches, shared by every request of a batch); see `_fold_vmap_axis`.
    kernel_takes: per platform, `takes(*avals, implementation, **params) -> bool`:
    whether that platform's kernel serves these operands; where it does not, the
    lowering takes the reference (or raises NoKernelError for implementation="kernel").
    kernel_lowering: per platform, a JAX function of the operands and params
    that runs the kernels there (e.g. a hidden primitive with workspace
    results), used instead of a call of target `jax_msa_<name>`.
    portable_cuda_targets: with a CUDA kernel_lowering, the CUDA targets it
    binds where the portable family serves (kernel_family.h; none: it needs the
    build's native family, and other GPUs take the reference).
    """
    target = f"jax_msa_{name}"
    prim = Primitive(target)
    prim.multiple_results = True
    if _apply_primitive is not None:
        prim.def_impl(lambda *args, **params: _apply_primitive(prim, *args, **params))
    prim.def_abstract_eval(lambda *avals, implementation, **params: abstract_eval(*avals, **params))
    layout = _partitioning.Layout.parse(sharding) if sharding else None
    for platform in LOWERING_PLATFORMS:
        takes = (kernel_takes or {}).get(platform, lambda *avals, implementation, **params: True)
        rule = _lowering(prim, layout, platform, reference, ffi_attributes, takes,
                         (kernel_lowering or {}).get(platform), tuple(portable_cuda_targets))
        mlir.register_lowering(prim, rule, platform=platform)
    _partitioning.register(prim)
    batching.primitive_batchers[prim] = lambda args, dims, **params: _fold_vmap_axis(
        prim, args, dims, params, shared_operands)
    return prim


def _lowering(prim: Primitive, layout, platform: str, reference: Callable, ffi_attributes: Sequence[str],
              takes: Callable[..., bool], kernel_fn: Callable | None, portable_targets: tuple[str, ...]):
    target = prim.name
    # The CUDA targets the kernel path calls, as far as the portable family goes.
    needs = (target,) if kernel_fn is None else portable_targets
    if kernel_fn is None:
        ffi_rule = jax.ffi.ffi_lowering(target)
        kernel_rule = lambda ctx, *args, implementation, **params: ffi_rule(
            ctx, *args, **{k: params[k] for k in ffi_attributes})
    else:
        kernel_rule = mlir.lower_fun(lambda *args, **params: list(kernel_fn(*args, **params)), multiple_results=True)
    fallback_rule = mlir.lower_fun(lambda *args, **params: list(reference(*args, **params)), multiple_results=True)

    def rule(ctx, *args, implementation: str, **params):
        if _partitioning.is_partitioned(ctx):
            return _partitioning.lower_partitioned(prim, layout, ctx, *args, implementation=implementation, **params)
        has_kernel = kernel_fn is not None or _ffi.has_kernel(target, platform)
        # A build's CUDA kernels may not run on this GPU (another architecture).
        device_gap = _ffi.cuda_kernels_missing(needs) if has_kernel and platform == "cuda" else None
        if has_kernel and device_gap is None and takes(*ctx.avals_in, implementation=implementation, **params):
            return kernel_rule(ctx, *args, implementation=implementation, **params)
        if implementation == "kernel":
            why = device_gap or ("these inputs" if has_kernel else "this build")
            raise NoKernelError(
                f"jax_msa: no {platform} kernel for {target} for {why}; "
                "use implementation='auto' (falls back to the reference) or 'reference'"
            )
        return fallback_rule(ctx, *args, **params)

    return rule


def _fold_vmap_axis(prim: Primitive, args, dims, params, shared: int = 0):
    """vmap rule: [n, B, ...] operands become [n*B, ...] and back.

    The first `shared` operands have no batch axis and pass through unchanged,
    as a decode batch shares one page pool. Where one of them is vmapped there
    is no axis to fold into: the members then run one after another.
    """
    if any(d is not None for d in dims[:shared]):
        def member(batched):
            it = iter(batched)
            return prim.bind(*[a if d is None else next(it) for a, d in zip(args, dims)], **params)

        outs = jax.lax.map(member, [jnp.moveaxis(a, d, 0) for a, d in zip(args, dims) if d is not None])
        return outs, [0] * len(outs)
    n = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    folded = []
    for a, d in zip(args[shared:], dims[shared:]):
        a = jnp.broadcast_to(a, (n, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        folded.append(a.reshape((n * a.shape[1], *a.shape[2:])))
    outs = prim.bind(*args[:shared], *folded, **params)
    return [o.reshape((n, o.shape[0] // n, *o.shape[1:])) for o in outs], [0] * len(outs)
