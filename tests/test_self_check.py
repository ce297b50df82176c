"""The native kernel family's self-check and its fallback (jax_msa/_self_check.py).

On the CPU: a process that sees a compute capability 10.0 GPU and a build
with a Blackwell-family kernel is simulated, and the families' results are
injected (agreeing, disagreeing, failing). On a GPU (skipped elsewhere): the
real check of the native family against the portable one, then with a
mismatch injected into the native results."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jax_msa
from jax_msa import _ffi, _jax_msa, _self_check, reference
from helpers import first_gpu, normal, rel_err

SPARSE = "jax_msa_sparse_attention_fwd_query"
RESULTS = [np.linspace(-3.0, 3.0, 64, dtype=np.float32).reshape(8, 8),
           np.array([0.5, -np.inf, 2.0], np.float32)]


@pytest.fixture
def unchecked():
    """The process-wide verdict starts unchecked and is put back so afterwards."""
    _jax_msa.set_native_check("unchecked")
    yield
    _jax_msa.set_native_check("unchecked")


@pytest.fixture
def blackwell(monkeypatch, unchecked):
    """A simulated sm_100 process: its only GPU has compute capability 10.0 and the
    build's sparse forward has a Blackwell kernel (no GPU needed). Returns the
    families the check ran, in order."""
    monkeypatch.delenv("JAX_MSA_KERNELS", raising=False)
    monkeypatch.setattr(_ffi, "cuda_device_capabilities", lambda: ("10.0",))
    monkeypatch.setattr(_ffi, "built_with_cuda", lambda: True)
    monkeypatch.setattr(_ffi, "cuda_architectures", lambda: ("90a",))
    monkeypatch.setattr(_ffi, "blackwell_targets", lambda: frozenset({SPARSE}))
    monkeypatch.setattr(_ffi, "portable_targets", lambda: frozenset({SPARSE}))
    runs = []
    monkeypatch.setattr(_self_check, "_run", lambda case, family: runs.append(family) or [r.copy() for r in RESULTS])
    return runs


def _inject(monkeypatch, runs, change):
    """The native family's results pass through `change` (a mismatch, an error)."""
    def run(case, family):
        runs.append(family)
        results = [r.copy() for r in RESULTS]
        return change(results) if family == "native" else results
    monkeypatch.setattr(_self_check, "_run", run)


def _wrong_value(results):
    results[0][3, 4] += 1.0
    return results


def _wrong_infinity(results):
    results[1][1] = 0.0
    return results


def _launch_failure(results):
    raise RuntimeError("CUDA error: an illegal instruction was encountered")


@pytest.mark.parametrize("change", [_wrong_value, _wrong_infinity, _launch_failure])
def test_a_mismatch_disables_the_native_family_with_one_warning(blackwell, monkeypatch, change):
    _inject(monkeypatch, blackwell, change)
    with pytest.warns(jax_msa.SelfCheckWarning, match="disabled for this process") as caught:
        # The first lowering that could use a Blackwell kernel runs the check; the portable one serves.
        assert _ffi.cuda_kernels_missing((SPARSE,)) is None
    assert len(caught) == 1
    # Only the op with a Blackwell kernel ran (a native error stops its case).
    ran = ["native"] if change is _launch_failure else ["native", "portable"]
    assert blackwell == ran
    assert _ffi.native_check() == "failed" and not _ffi.blackwell_serves("10.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ffi.cuda_kernels_missing((SPARSE,)) is None  # once per process: no second run, no warning
    assert blackwell == ran


def test_agreement_lets_the_blackwell_family_serve(blackwell):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ffi.blackwell_serves("10.0")
    assert blackwell == ["native", "portable"] and _ffi.native_check() == "passed"
    assert _ffi.blackwell_serves("10.0") and blackwell == ["native", "portable"]


def test_an_untested_family_never_serves_unchecked_and_native_forces_it(blackwell, monkeypatch):
    """Where the check is running (its own lowerings) the answer is no; with
    JAX_MSA_KERNELS=native there is no check; =portable never asks."""
    _self_check._running.set()
    try:
        assert not _self_check.ensure_checked() and blackwell == []
    finally:
        _self_check._running.clear()
    monkeypatch.setenv("JAX_MSA_KERNELS", "native")
    assert _ffi.blackwell_serves("10.0") and blackwell == [] and _ffi.native_check() == "unchecked"
    monkeypatch.setenv("JAX_MSA_KERNELS", "portable")
    assert not _ffi.blackwell_serves("10.0") and blackwell == []


def test_the_family_request_and_override():
    assert _ffi.family_request() in ("by_device", "native", "portable")
    _jax_msa.set_family_override("portable")
    try:
        assert _ffi.family_request() == "portable" and _ffi.portable_forced()
    finally:
        _jax_msa.set_family_override(None)
    with pytest.raises(ValueError, match="unknown value"):
        _jax_msa.set_family_override("fastest")


def test_difference_between_the_families():
    same = [r.copy() for r in RESULTS]
    assert _self_check.difference(RESULTS, same) == 0.0
    assert _self_check.difference(_wrong_value([r.copy() for r in RESULTS]), RESULTS) == pytest.approx(1 / 3)
    assert _self_check.difference(_wrong_infinity([r.copy() for r in RESULTS]), RESULTS) == np.inf
    nan = [r.copy() for r in RESULTS]
    nan[0][0, 0] = np.nan
    assert _self_check.difference(nan, RESULTS) == np.inf
    assert _self_check.difference(nan, [r.copy() for r in nan]) == 0.0  # the same NaN in both families
    assert _self_check.difference([RESULTS[0][:4]], [RESULTS[0]]) == np.inf


@pytest.mark.skipif(not _ffi.has_kernel(SPARSE, "cuda"),
                    reason="needs a build with the CUDA kernels (no GPU needed: lowering only)")
def test_kernel_info_says_which_family_and_why(blackwell, monkeypatch):
    assert jax_msa.kernel_info("cuda")["sparse_attention"].startswith(
        "CUDA kernel, Blackwell family (sm_100a, self-check passed)")
    _jax_msa.set_native_check("unchecked")
    _inject(monkeypatch, blackwell, _wrong_value)
    with pytest.warns(jax_msa.SelfCheckWarning):
        info = jax_msa.kernel_info("cuda")["sparse_attention"]
    assert info.startswith("CUDA kernel, portable family (sm_80 PTX; the native family failed its self-check)"), info


@pytest.mark.gpu
@pytest.mark.skipif(first_gpu() is None, reason="needs a GPU")
def test_the_real_check_passes_then_an_injected_mismatch_falls_back(unchecked, monkeypatch):
    """On this GPU the native family (Hopper on an H100) agrees with the portable
    one; a mismatch injected into its results disables it, and the sparse
    forward then runs the portable kernel, still right."""
    monkeypatch.delenv("JAX_MSA_KERNELS", raising=False)
    checked = jax_msa.self_check()
    assert "sparse_attention" in checked and "dot_product_attention" in checked, checked
    assert all(err <= _self_check.TOLERANCE for err in checked.values()), checked
    assert _ffi.native_check() == "passed"
    run = _self_check._run
    monkeypatch.setattr(_self_check, "_run", lambda case, family: _wrong_value_gpu(run(case, family), family))
    with pytest.warns(jax_msa.SelfCheckWarning):
        jax_msa.self_check()
    assert _ffi.native_check() == "failed"
    assert jax_msa.kernel_info("cuda")["sparse_attention"].startswith("CUDA kernel, portable family")
    rng = np.random.default_rng(3)
    q, k = normal(rng, (1, 500, 16, 128), jnp.bfloat16), normal(rng, (1, 500, 1, 128), jnp.bfloat16)
    ids = reference.indexer(normal(rng, (1, 500, 1, 64)), normal(rng, (1, 500, 64)), topk=3)
    out = jax_msa.sparse_attention(q, k, k, ids, implementation="kernel")
    assert rel_err(out, reference.sparse_attention(q, k, k, ids)) <= 2e-2


def _wrong_value_gpu(results, family):
    if family == "native":
        results[0] = results[0] + 1.0
    return results


@pytest.mark.skipif(not _ffi.built_with_cuda(), reason="needs a build with the CUDA kernels")
def test_every_blackwell_target_has_a_portable_kernel_to_check_against():
    assert _ffi.blackwell_targets() and _ffi.blackwell_targets() <= _ffi.portable_targets()
