"""The native kernel family's self-check (kernels/cuda/kernel_family.h).

No card of the Blackwell family's kind (sm_100a) ran its kernels before
release, so on such a device they serve only once the same small problems,
run through them and through the portable family (tested on Hopper), agree.
The check runs once per process, on the first lowering that could use a
Blackwell kernel; on a mismatch (or an error) the native family is disabled
with one warning and the portable family serves. `self_check()` runs it on
demand on any GPU (on Hopper it compares the Hopper and portable families).
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_msa import _ffi, _jax_msa

# Largest |native - portable| / max |portable| accepted per result: both
# families round bf16 inputs and P the same way, so they differ by float32
# summation order (~1e-3); a wrong kernel differs by O(1).
TOLERANCE = 2e-2


class SelfCheckWarning(UserWarning):
    """The native kernel family failed its self-check: the portable family serves instead."""


def _cases() -> dict[str, tuple[tuple[str, ...], Callable[[], list[jax.Array]]]]:
    """Op -> (the CUDA targets it runs, a function computing its results on small hostile inputs).

    Unaligned lengths, padded rows, GQA, -1 and out-of-range ids: the cases
    a wrong tiling or mask gets wrong first.
    """
    import jax_msa  # the public ops (this module is imported while the package initialises)

    rng = np.random.default_rng(20261127)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    b, s, hq, hkv, d = 2, 333, 8, 2, 128
    q, k, v = normal(b, s, hq, d), normal(b, s, hkv, d), normal(b, s, hkv, d)
    q_lengths, kv_lengths = jnp.asarray([s, 200], jnp.int32), jnp.asarray([s, 250], jnp.int32)
    ids = jnp.asarray(rng.integers(-2, 5, (b, s, hkv, 6)), jnp.int32)
    qi, ki = normal(b, s, 4, 64), normal(b, s, 64)

    def sparse():
        return jax_msa.sparse_attention(q, k, v, ids, q_lengths=q_lengths, kv_lengths=kv_lengths, return_lse=True,
                                        implementation="kernel", schedule="query")

    def dense():
        return jax_msa.dot_product_attention(q, k, v, causal=True, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                             return_lse=True, implementation="kernel")

    def scores():
        return [jax_msa.block_scores(qi, ki, q_lengths=q_lengths, kv_lengths=kv_lengths, implementation="kernel")]

    return {
        "sparse_attention": (("jax_msa_sparse_attention_fwd_query",), jax.jit(sparse)),
        "dot_product_attention": (("jax_msa_dot_product_attention_fwd",), jax.jit(dense)),
        "block_scores": (("jax_msa_block_scores",), jax.jit(scores)),
    }


def _run(case: Callable[[], list[jax.Array]], family: str) -> list[np.ndarray]:
    """The case's results with `family` ("native" or "portable") asked for, as float32 arrays."""
    _jax_msa.set_family_override(family)
    try:
        return [np.asarray(x, np.float32) for x in jax.block_until_ready(case())]
    finally:
        _jax_msa.set_family_override(None)


def difference(native: list[np.ndarray], portable: list[np.ndarray]) -> float:
    """Largest |native - portable| / max |portable| over the results; inf where their non-finite entries differ
    (NaN agrees with NaN)."""
    worst = 0.0
    for n, p in zip(native, portable, strict=True):
        finite = np.isfinite(p)
        if (n.shape != p.shape or not np.array_equal(finite, np.isfinite(n))
                or not np.array_equal(n[~finite], p[~finite], equal_nan=True)):
            return float("inf")
        if finite.any():
            top = float(np.max(np.abs(p[finite]))) or 1.0
            worst = max(worst, float(np.max(np.abs(n[finite] - p[finite]))) / top)
    return worst


def self_check(ops: tuple[str, ...] | None = None) -> dict[str, float]:
    """Runs the native kernel family's self-check now, on the default CUDA device, and records its verdict.

    Each op with both a native and a portable-family kernel runs a small
    problem through both; their results must agree within `TOLERANCE`. On a
    mismatch, or an error in either, the native family is disabled for this
    process (a `SelfCheckWarning` says why) and the portable family serves.

    Args:
      ops: the ops to check (default: every op the native family has a kernel for).
    Returns:
      {op: largest relative difference between the families} (inf on a mismatch of non-finite entries or an error).
    """
    if not _ffi.cuda_device_capabilities() or not _ffi.built_with_cuda():
        raise RuntimeError("jax_msa.self_check needs a CUDA device and a build with the CUDA kernels")
    native = _ffi.blackwell_targets() if "10.0" in _ffi.cuda_device_capabilities() else None
    checked, errors = {}, {}
    for op, (targets, case) in _cases().items():
        if ops is not None and op not in ops:
            continue
        if not set(targets) <= _ffi.portable_targets() or (native is not None and not set(targets) <= native):
            continue
        try:
            checked[op] = difference(_run(case, "native"), _run(case, "portable"))
        except Exception as e:  # a kernel that fails to run fails its check
            checked[op], errors[op] = float("inf"), f"{type(e).__name__}: {e}"
    failed = {op: err for op, err in checked.items() if not err <= TOLERANCE}
    _jax_msa.set_native_check("failed" if failed else "passed")
    if failed:
        warnings.warn(
            "jax_msa: the native CUDA kernel family disagrees with the portable family on this device "
            f"(largest relative differences {failed}, tolerance {TOLERANCE}"
            + (f"; errors: {errors}" if errors else "")
            + "); it is disabled for this process and the portable family serves (JAX_MSA_KERNELS=native "
            "forces it back). Please report this.",
            SelfCheckWarning, stacklevel=2)
    return checked


_lock = threading.Lock()
_running = threading.Event()


def ensure_checked() -> bool:
    """Runs the self-check once per process if it has not run; whether the native family passed it.

    Called by the lowering (jax_msa/_ffi.py) before a Blackwell kernel could
    serve. The check runs in a thread of its own, outside the trace or
    lowering that asked; the check's own lowerings find it running and get
    False (the portable family), as do other threads meanwhile.
    """
    if _running.is_set():
        return False
    with _lock:
        if _ffi.native_check() == "unchecked":
            _running.set()
            try:
                worker = threading.Thread(target=lambda: _catch_all(self_check), name="jax_msa self-check")
                worker.start()
                worker.join()
            finally:
                _running.clear()
    return _ffi.native_check() == "passed"


def _catch_all(check: Callable[[], object]) -> None:
    try:
        check()
    except Exception as e:  # never leave the family unchecked: an unexpected error fails it
        _jax_msa.set_native_check("failed")
        warnings.warn(f"jax_msa: the native family's self-check failed to run ({type(e).__name__}: {e}); "
                      "the portable family serves", SelfCheckWarning, stacklevel=2)
