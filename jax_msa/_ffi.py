"""Loads the compiled extension and registers its XLA FFI targets with JAX."""

from __future__ import annotations

import re
from typing import Sequence

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


def cuda_architectures() -> tuple[str, ...]:
    """The CUDA architectures the kernels were compiled for, e.g. ``("90a",)``; ``()`` without CUDA."""
    return tuple(a for a in str(_jax_msa.cuda_architectures).split(",") if a)


def runs_on(arch: str, capability: str) -> bool:
    """Whether code compiled for `arch` ("90a", "100f", "90") runs on compute capability `capability` ("9.0").

    An "a" architecture (wgmma, setmaxnreg, tcgen05) runs only on its own
    capability; an "f" or plain one on the later minor versions of its major.
    """
    digits = arch.rstrip("af")
    major, minor = int(digits[:-1]), int(digits[-1])
    dev_major, dev_minor = (int(x) for x in capability.split("."))
    if arch.endswith("a"):
        return (dev_major, dev_minor) == (major, minor)
    return dev_major == major and dev_minor >= minor


def cuda_device_capabilities() -> tuple[str, ...]:
    """Compute capabilities ("9.0") of the CUDA devices JAX sees; () when it sees none."""
    try:
        devices = jax.devices("cuda")
    except RuntimeError:  # no CUDA backend in this process
        return ()
    # A device that does not say, or not as "major.minor", is not held against the kernels.
    found = {str(getattr(d, "compute_capability", "")) for d in devices}
    return tuple(sorted(c for c in found if re.fullmatch(r"\d+\.\d+", c)))


def portable_targets() -> frozenset[str]:
    """The CUDA targets that also serve on any GPU since sm_80 (the portable family, built as sm_80 PTX)."""
    return frozenset(str(t) for t in _jax_msa.portable_cuda_targets())


def blackwell_targets() -> frozenset[str]:
    """The CUDA targets with a Blackwell-family kernel (sm_100a; it serves once its self-check passed)."""
    return frozenset(str(t) for t in _jax_msa.blackwell_cuda_targets())


def family_request() -> str:
    """The kernel family asked for: "by_device", "native" or "portable" (JAX_MSA_KERNELS, or the self-check's own)."""
    return str(_jax_msa.family_request())


def portable_forced() -> bool:
    """Whether JAX_MSA_KERNELS=portable asks for the portable family on every GPU (tests run it on Hopper)."""
    return family_request() == "portable"


def native_check() -> str:
    """The native family's self-check: "unchecked", "passed" or "failed" (jax_msa/_self_check.py)."""
    return str(_jax_msa.native_check())


def _native_runs(capability: str) -> bool:
    """Whether the build's native (Hopper) family serves on `capability`."""
    if portable_forced() or (native_check() == "failed" and family_request() != "native"):
        return False
    return any(runs_on(a, capability) for a in cuda_architectures())


def blackwell_serves(capability: str) -> bool:
    """Whether the Blackwell family serves on `capability`: sm_100a code, run only after its self-check passed
    (which this call runs on first use) or with JAX_MSA_KERNELS=native."""
    if capability != "10.0" or not blackwell_targets() or portable_forced():
        return False
    if family_request() == "native":
        return True
    from jax_msa import _self_check  # it runs the ops, which import this module
    return _self_check.ensure_checked()


def _portable_runs(capability: str) -> bool:
    return bool(cuda_architectures()) and tuple(int(x) for x in capability.split(".")) >= (8, 0)


def portable_family_serves() -> bool:
    """Whether the Hopper family does not serve on some CUDA device of this process (or JAX_MSA_KERNELS=portable):
    the portable family serves there, and the Blackwell family where it has a kernel (same coverage: the
    query-outer sparse forward, the dense forward with G <= 128)."""
    return portable_forced() or any(not _native_runs(c) for c in cuda_device_capabilities())


def cuda_kernels_missing(targets: Sequence[str] = ()) -> str | None:
    """Why the CUDA kernels of `targets` cannot serve on this process's CUDA devices; None when they can.

    A device runs the build's native (Hopper) family where the build has code
    for its architecture (and the family did not fail its self-check), the
    Blackwell family's targets on compute capability 10.0 once its self-check
    passed, and targets of the portable family wherever it is sm_80 or later.
    `targets` empty: the native family only. With no CUDA device in sight
    (lowering ahead of time, or on a CPU-only host) the kernels are taken to
    serve: they are lowered for the build's architectures (with
    JAX_MSA_KERNELS=portable, for the portable family).
    """
    portable = bool(targets) and set(targets) <= portable_targets()
    blackwell = bool(targets) and set(targets) <= blackwell_targets()
    if portable_forced() and not portable:
        return "JAX_MSA_KERNELS=portable (no portable-family kernel)"
    missing = [c for c in cuda_device_capabilities()
               # Blackwell first: asking runs its self-check before any of its kernels can.
               if not ((blackwell and blackwell_serves(c)) or _native_runs(c) or (portable and _portable_runs(c)))]
    if not missing:
        return None
    if native_check() == "failed" and family_request() != "native":
        return f"compute capability {', '.join(missing)} (the native family failed its self-check)"
    built = ", ".join(f"sm_{a}" for a in cuda_architectures()) or "no CUDA architecture"
    return f"compute capability {', '.join(missing)} (this build has kernels for {built} only)"


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
