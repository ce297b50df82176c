"""`kernel_info()`: which implementation serves each jax_msa op here, and why."""

from __future__ import annotations

import jax

from jax_msa import _ffi

# Public op -> (its CPU FFI targets, its CUDA FFI targets); the forward's first.
_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "block_scores": (("jax_msa_block_scores",), ("jax_msa_block_scores",)),
    "topk_select": (("jax_msa_topk_select",), ("jax_msa_topk_select",)),
    "indexer": (("jax_msa_indexer",), ("jax_msa_indexer_scores", "jax_msa_indexer_select")),
    "indexer_kl_loss": (("jax_msa_indexer_kl_loss",), ()),
    "sparse_attention": (("jax_msa_sparse_attention_fwd", "jax_msa_sparse_attention_bwd"),
                         ("jax_msa_sparse_attention_fwd_query", "jax_msa_sparse_attention_bwd_cuda")),
    "dot_product_attention": (("jax_msa_dot_product_attention_fwd", "jax_msa_dot_product_attention_bwd"),
                              ("jax_msa_dot_product_attention_fwd", "jax_msa_dot_product_attention_bwd_cuda")),
    "paged_indexer": (("jax_msa_paged_indexer",), ("jax_msa_paged_indexer_scores",)),
    "paged_attention": (("jax_msa_paged_attention",), ("jax_msa_paged_attention_cuda",)),
}


def _describe(platform: str, targets: tuple[str, ...]) -> str:
    have = [t for t in targets if _ffi.has_kernel(t, platform)]
    if platform == "cpu":
        return "C++ CPU kernel" if have and len(have) == len(targets) else "reference: no CPU kernel"
    if not _ffi.built_with_cuda():
        return "reference: this build has no CUDA kernels"
    if not have:
        return "reference: no CUDA kernel for this op yet"
    # The forward serves if the native family does, or its portable target (the first listed).
    serving = [t for t in have if _ffi.cuda_kernels_missing((t,)) is None]
    if targets[0] not in serving:
        return f"reference: {_ffi.cuda_kernels_missing((targets[0],))}"
    scope = "" if len(serving) == len(targets) else " (forward; the backward runs the reference)"
    return f"CUDA kernel, {_family(targets[0])}{scope}"


def _family(target: str) -> str:
    """The kernel family serving CUDA target `target` on this process's devices, and why."""
    if target in _ffi.blackwell_targets() and any(_ffi.blackwell_serves(c) for c in _ffi.cuda_device_capabilities()):
        why = "JAX_MSA_KERNELS=native" if _ffi.family_request() == "native" else "self-check passed"
        return f"Blackwell family (sm_100a, {why})"
    if _ffi.portable_family_serves():
        failed = _ffi.native_check() == "failed" and _ffi.family_request() != "native"
        return "portable family (sm_80 PTX" + ("; the native family failed its self-check)" if failed else ")")
    return "Hopper family (" + ", ".join(f"sm_{a}" for a in _ffi.cuda_architectures()) + ")"


def kernel_info(platform: str | None = None) -> dict[str, str]:
    """Which implementation serves each op under ``implementation="auto"``, and why.

    Args:
      platform: ``"cpu"`` or ``"cuda"``; default: JAX's default backend.

    Returns:
      ``{op name: description}``, e.g. ``"CUDA kernel, Hopper family
      (sm_90a)"``, ``"CUDA kernel, Blackwell family (sm_100a, self-check
      passed)"`` (jax_msa.self_check), ``"CUDA kernel, portable family (sm_80
      PTX)"`` (any GPU since sm_80; JAX_MSA_KERNELS=portable forces it), or
      ``"reference: compute capability 7.5 (this build has kernels for sm_90a
      only)"``.
      Where a kernel serves, it may still decline particular inputs (dtypes,
      head dims, sizes: see the README), which then run the reference.
    """
    platform = platform or jax.default_backend()
    platform = "cuda" if platform == "gpu" else platform
    if platform not in ("cpu", "cuda"):
        return {op: f"reference: no {platform} kernels" for op in _TARGETS}
    return {op: _describe(platform, cpu if platform == "cpu" else cuda) for op, (cpu, cuda) in _TARGETS.items()}
