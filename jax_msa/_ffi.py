"""Loads the compiled extension and registers its XLA FFI targets with JAX."""

from __future__ import annotations

import jax

from jax_msa import _jax_msa

try:  # XLA reads a handler's traits from its registration, not from the handler.
    from jaxlib.xla_client import CustomCallTargetTraits
    _CUDA_TRAITS = dict(traits=CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE)
except ImportError:  # a jaxlib without traits: the targets stay out of command buffers
    _CUDA_TRAITS = {}

# Lowering platform name (as JAX spells it) -> FFI targets with a kernel there.
_KERNEL_TARGETS: dict[str, frozenset[str]] = {}


def _register() -> None:
    cpu = _jax_msa.cpu_targets()
    for name, capsule in cpu.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _KERNEL_TARGETS["cpu"] = frozenset(cpu)
    cuda = _jax_msa.cuda_targets()
    for name, capsule in cuda.items():
        # Every CUDA handler may be recorded into a CUDA graph (JAX_MSA_CUDA_HANDLER).
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA", **_CUDA_TRAITS)
    _KERNEL_TARGETS["cuda"] = frozenset(cuda)


_register()


def has_kernel(target: str, platform: str) -> bool:
    """Whether FFI target `target` has a kernel for lowering platform `platform`."""
    return target in _KERNEL_TARGETS.get(platform, frozenset())


def built_with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_jax_msa.with_cuda)


def sparse_bwd_workspace(B: int, Sq: int, Sk: int, Hq: int, Hkv: int, D: int, topk: int) -> tuple[int, ...]:
    """Element counts (delta floats, index ints, partial floats, dq_accum floats) of the CUDA sparse backward's workspaces."""
    return tuple(int(n) for n in _jax_msa.sparse_bwd_workspace(B, Sq, Sk, Hq, Hkv, D, topk))


def dense_bwd_workspace(B: int, Sq: int, Sk: int, Hq: int, Hkv: int, D: int) -> tuple[int, ...]:
    """Element counts (delta floats, index ints, partial floats, dq_accum floats) of the CUDA dense backward's workspaces."""
    return tuple(int(n) for n in _jax_msa.dense_bwd_workspace(B, Sq, Sk, Hq, Hkv, D))


def sparse_fwd_by_block_workspace(B: int, Sq: int, Sk: int, Hq: int, Hkv: int, D: int, topk: int) -> tuple[int, int]:
    """Sizes (index int32 elements, partial bytes) of the CUDA KV-outer sparse forward's workspaces."""
    return tuple(int(n) for n in _jax_msa.sparse_fwd_by_block_workspace(B, Sq, Sk, Hq, Hkv, D, topk))


def paged_attention_splits(B: int, Q: int, Hq: int, Hkv: int, max_pages: int, topk: int) -> int:
    """CTAs per tile (split-KV) of the CUDA paged attention; topk 0: dense."""
    return int(_jax_msa.paged_attention_splits(B, Q, Hq, Hkv, max_pages, topk))


def paged_attention_workspace(B: int, Q: int, Hq: int, D: int, splits: int) -> int:
    """Float32 elements of the CUDA paged attention's split-KV workspace."""
    return int(_jax_msa.paged_attention_workspace(B, Q, Hq, D, splits))
