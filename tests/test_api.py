"""The public API: custom calls in the HLO, vmap, autodiff, implementation=, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_msa
from jax_msa import _ffi, reference
from helpers import normal, rel_err

RNG = np.random.default_rng(11)
B, S, HQ, HKV, D = 2, 260, 4, 2, 32
Q, K, V = normal(RNG, (B, S, HQ, D)), normal(RNG, (B, S, HKV, D)), normal(RNG, (B, S, HKV, D))
QI, KI = normal(RNG, (B, S, HKV, 32)), normal(RNG, (B, S, 32))
IDS = reference.indexer(QI, KI, topk=2)
SCORES = reference.block_scores(QI, KI)

# Each op, called on the module's inputs, and the FFI targets its lowering must show.
OPS = {
    "block_scores": (lambda: jax_msa.block_scores(QI, KI), ["jax_msa_block_scores"]),
    "topk_select": (lambda: jax_msa.topk_select(SCORES, topk=2), ["jax_msa_topk_select"]),
    "indexer": (lambda: jax_msa.indexer(QI, KI, topk=2, return_lse=True), ["jax_msa_indexer"]),
    "sparse_attention": (lambda: jax_msa.sparse_attention(Q, K, V, IDS), ["jax_msa_sparse_attention_fwd"]),
    "msa_attention": (lambda: jax_msa.msa_attention(Q, K, V, QI, KI, topk=2),
                      ["jax_msa_indexer", "jax_msa_sparse_attention_fwd"]),
    "dot_product_attention": (lambda: jax_msa.dot_product_attention(Q, K, V), ["jax_msa_dot_product_attention_fwd"]),
    "sparse_attention_grad": (
        lambda: jax.grad(lambda q: jax_msa.sparse_attention(q, K, V, IDS).sum())(Q),
        ["jax_msa_sparse_attention_fwd", "jax_msa_sparse_attention_bwd"]),
    "dot_product_attention_grad": (
        lambda: jax.grad(lambda q: jax_msa.dot_product_attention(q, K, V).sum())(Q),
        ["jax_msa_dot_product_attention_fwd", "jax_msa_dot_product_attention_bwd"]),
}


@pytest.mark.parametrize("name", list(OPS))
def test_lowering_contains_custom_call(name):
    fn, targets = OPS[name]
    text = jax.jit(fn).lower().as_text()
    for target in targets:
        assert f"@{target}(" in text, f"{target} missing from the lowering of {name}"


def test_reference_implementation_has_no_custom_call():
    text = jax.jit(lambda: jax_msa.sparse_attention(Q, K, V, IDS, implementation="reference")).lower().as_text()
    assert "jax_msa_" not in text


def _lower_for_cuda(fn):
    return jax.jit(fn).trace().lower(lowering_platforms=("cuda",)).as_text()


def _custom_call_line(text: str, target: str) -> str:
    """The line of the lowered module that calls `target`."""
    (line,) = [l for l in text.splitlines() if f"@{target}(" in l]
    return line


@pytest.mark.skipif(_ffi.has_kernel("jax_msa_indexer_kl_loss", "cuda"),
                    reason="checks the fallback of an op without a CUDA kernel")
def test_cuda_lowering_falls_back_to_reference_without_kernels():
    text = _lower_for_cuda(lambda: jax_msa.indexer_kl_loss(Q, K, QI, KI, IDS))
    assert "jax_msa_indexer_kl_loss" not in text
    with pytest.raises(jax_msa.NoKernelError, match="no cuda kernel"):
        _lower_for_cuda(lambda: jax_msa.indexer_kl_loss(Q, K, QI, KI, IDS, implementation="kernel"))


@pytest.mark.skipif(not _ffi.has_kernel("jax_msa_sparse_attention_fwd_query", "cuda"),
                    reason="needs a build with the CUDA kernels (no GPU needed: lowering only)")
def test_cuda_sparse_kernels_serve_auto_and_cover_what_they_can():
    rng = np.random.default_rng(3)
    q, k, v = (normal(rng, (2, 300, h, 128), jnp.bfloat16) for h in (16, 1, 1))
    ids = jnp.asarray(rng.integers(-1, 3, (2, 300, 1, 4)), jnp.int32)
    kernel = lambda q, k, v: jax_msa.sparse_attention(q, k, v, ids, implementation="kernel")
    # "auto" takes the kernels, with the schedule picked on the device.
    assert "jax_msa_sparse_attention_fwd_auto" in _lower_for_cuda(lambda: jax_msa.sparse_attention(q, k, v, ids))
    for schedule, target in (("query", "fwd_query"), ("block", "fwd_by_block")):
        text = _lower_for_cuda(lambda: jax_msa.sparse_attention(q, k, v, ids, schedule=schedule))
        assert f"jax_msa_sparse_attention_{target}" in text and "fwd_auto" not in text
    reference = _lower_for_cuda(lambda: jax_msa.sparse_attention(q, k, v, ids, implementation="reference"))
    assert "jax_msa_sparse_attention" not in reference
    # The backward: one call with its workspaces as extra results.
    grad = jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    assert "jax_msa_sparse_attention_bwd_cuda" in _lower_for_cuda(lambda: grad(q, k, v))
    # Inputs the kernels do not take: float32, head dim 64 (under "auto": the reference).
    assert "jax_msa_sparse" not in _lower_for_cuda(
        lambda: jax_msa.sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)), ids))
    with pytest.raises(jax_msa.NoKernelError, match="these inputs"):
        _lower_for_cuda(lambda: kernel(*(x.astype(jnp.float32) for x in (q, k, v))))
    with pytest.raises(jax_msa.NoKernelError, match="these inputs"):
        _lower_for_cuda(lambda: kernel(q[..., :64], k[..., :64], v[..., :64]))


@pytest.mark.parametrize("arch,capability,runs", [
    ("90a", "9.0", True), ("90a", "8.0", False), ("90a", "10.0", False), ("90a", "9.1", False),
    ("100a", "10.0", True), ("100f", "10.3", True), ("100f", "12.0", False), ("80", "8.6", True),
    ("80", "9.0", False), ("86", "8.0", False)])
def test_which_architectures_run_on_which_devices(arch, capability, runs):
    assert _ffi.runs_on(arch, capability) is runs


def test_kernel_info_names_every_op_and_its_implementation():
    cpu = jax_msa.kernel_info("cpu")
    assert set(cpu) >= {"sparse_attention", "dot_product_attention", "indexer", "paged_attention"}
    assert all(desc == "C++ CPU kernel" for desc in cpu.values()), cpu
    cuda = jax_msa.kernel_info("cuda")
    assert cuda.keys() == cpu.keys()
    assert cuda["indexer_kl_loss"].startswith("reference")
    if _ffi.built_with_cuda():
        assert cuda["sparse_attention"] == f"CUDA kernel, Hopper family (sm_{_ffi.cuda_architectures()[0]})"
    else:
        assert all(desc == "reference: this build has no CUDA kernels" for desc in cuda.values())


@pytest.mark.skipif(not _ffi.has_kernel("jax_msa_dot_product_attention_fwd", "cuda"),
                    reason="needs a build with the CUDA kernels (no GPU needed: lowering only)")
def test_cuda_kernels_give_way_on_a_gpu_of_another_architecture(monkeypatch):
    """On a GPU the build has no code for (an A100 with an sm_90a build), "auto"
    lowers an op with no portable-family kernel to the reference and "kernel"
    says why, instead of failing at run time. The op: the indexer, with its
    targets taken out of the portable family (whichever ops have portable
    kernels by now)."""
    rng = np.random.default_rng(6)
    qi, ki = normal(rng, (1, 300, 2, 64), jnp.bfloat16), normal(rng, (1, 300, 64), jnp.bfloat16)
    assert "jax_msa_indexer" in _lower_for_cuda(lambda: jax_msa.indexer(qi, ki, topk=4))
    monkeypatch.setattr(_ffi, "portable_targets", lambda: frozenset())
    monkeypatch.setattr(_ffi, "cuda_device_capabilities", lambda: ("8.0", "9.0"))
    assert "jax_msa_" not in _lower_for_cuda(lambda: jax_msa.indexer(qi, ki, topk=4))
    with pytest.raises(jax_msa.NoKernelError, match="compute capability 8.0"):
        _lower_for_cuda(lambda: jax_msa.indexer(qi, ki, topk=4, implementation="kernel"))
    info = jax_msa.kernel_info("cuda")
    assert info["indexer"].startswith("reference: compute capability 8.0"), info


@pytest.mark.skipif(not _ffi.has_kernel("jax_msa_sparse_attention_fwd_query", "cuda"),
                    reason="needs a build with the CUDA kernels (no GPU needed: lowering only)")
@pytest.mark.parametrize("how", ["ampere", "forced"])
def test_portable_family_serves_where_the_native_one_cannot(how, monkeypatch):
    """On an sm_80 GPU (or with JAX_MSA_KERNELS=portable) the ops with a
    portable-family kernel lower to it (the sparse and dense attention
    forwards and backwards, topk_select, block_scores, the indexer, the paged
    indexer, paged attention), and kernel_info says which."""
    if how == "ampere":
        monkeypatch.setattr(_ffi, "cuda_device_capabilities", lambda: ("8.0",))
    else:
        monkeypatch.setenv("JAX_MSA_KERNELS", "portable")
    rng = np.random.default_rng(7)
    q, k = normal(rng, (1, 300, 16, 128), jnp.bfloat16), normal(rng, (1, 300, 1, 128), jnp.bfloat16)
    ids = reference.indexer(normal(rng, (1, 300, 1, 64)), normal(rng, (1, 300, 64)), topk=4)
    forward = _lower_for_cuda(lambda: jax_msa.sparse_attention(q, k, k, ids))  # schedule "auto"
    assert "jax_msa_sparse_attention_fwd_query" in forward and "fwd_auto" not in forward
    loss = lambda q: jnp.sum(jax_msa.sparse_attention(q, k, k, ids).astype(jnp.float32))
    assert "jax_msa_sparse_attention_bwd_cuda" in _lower_for_cuda(lambda: jax.grad(loss)(q))
    assert "jax_msa_topk_select" in _lower_for_cuda(
        lambda: jax_msa.topk_select(normal(rng, (1, 300, 1, 3)), topk=2))
    dense_loss = lambda q: jnp.sum(jax_msa.dot_product_attention(q, k, k, causal=True).astype(jnp.float32))
    dense = _lower_for_cuda(lambda: jax.grad(dense_loss)(q))
    assert "jax_msa_dot_product_attention_fwd" in dense
    # The portable dense backward writes dQ directly: its dq_accum workspace (the last result) is empty.
    bwd = _custom_call_line(dense, "jax_msa_dot_product_attention_bwd_cuda")
    assert "with_dq_accum = false" in bwd and bwd.endswith("tensor<0xf32>)"), bwd
    qi, ki = normal(rng, (1, 300, 1, 64), jnp.bfloat16), normal(rng, (1, 300, 64), jnp.bfloat16)
    indexer = _lower_for_cuda(lambda: jax_msa.indexer(qi, ki, topk=4, return_lse=True))
    assert all(f"jax_msa_{t}" in indexer for t in ("indexer_scores", "indexer_select", "selected_lse"))
    assert "jax_msa_block_scores" in _lower_for_cuda(lambda: jax_msa.block_scores(qi, ki))
    with pytest.raises(jax_msa.NoKernelError, match="these inputs"):  # float32: no kernel in either family
        _lower_for_cuda(lambda: jax_msa.indexer(qi.astype(jnp.float32), ki.astype(jnp.float32), topk=4,
                                                implementation="kernel"))
    # The paged indexer (scores, then the warp-per-row select), e4m3 cache.
    cache = jnp.asarray(normal(rng, (6, 128, 64))).astype(jnp.float8_e4m3fn)
    table, kv = jnp.asarray([[4, 1, 0], [2, 3, 5]], jnp.int32), jnp.asarray([300, 200], jnp.int32)
    paged = _lower_for_cuda(lambda: jax_msa.paged_indexer(normal(rng, (2, 4, 2, 64), jnp.bfloat16), cache, table,
                                                          kv, topk=2, ki_scale=0.5))
    assert "jax_msa_paged_indexer_scores" in paged and "jax_msa_indexer_select" in paged
    # Paged attention over bf16 pages [num_pages, Hkv, 128, D].
    pages = jnp.asarray(normal(rng, (6, 1, 128, 128)), jnp.bfloat16)
    attention = _lower_for_cuda(lambda: jax_msa.paged_attention(normal(rng, (2, 4, 16, 128), jnp.bfloat16), pages,
                                                                pages, table, kv))
    assert "jax_msa_paged_attention_cuda" in attention
    info = jax_msa.kernel_info("cuda")
    for op in ("paged_indexer", "sparse_attention", "dot_product_attention", "topk_select", "block_scores",
               "indexer", "paged_attention"):
        assert info[op] == "CUDA kernel, portable family (sm_80 PTX)", info


@pytest.mark.skipif(not _ffi.has_kernel("jax_msa_dot_product_attention_fwd", "cuda"),
                    reason="needs a build with the CUDA kernels (no GPU needed: lowering only)")
def test_cuda_dense_kernels_lower_where_they_apply():
    rng = np.random.default_rng(5)
    q, k = normal(rng, (2, 300, 16, 128), jnp.bfloat16), normal(rng, (2, 200, 4, 128), jnp.bfloat16)
    loss = lambda q, k: jnp.sum(jax_msa.dot_product_attention(q, k, k, causal=True).astype(jnp.float32))
    grad = _lower_for_cuda(lambda: jax.grad(loss, argnums=(0, 1))(q, k))
    assert "jax_msa_dot_product_attention_fwd" in grad and "jax_msa_dot_product_attention_bwd_cuda" in grad
    # The Hopper backward reduce-adds dQ into a float32 [B, Sq, Hq, D] workspace, the call's last result.
    bwd = _custom_call_line(grad, "jax_msa_dot_product_attention_bwd_cuda")
    assert "with_dq_accum = true" in bwd and bwd.endswith(f"tensor<{2 * 300 * 16 * 128}xf32>)"), bwd
    # D = 64: the forward's kernel, the reference backward.
    grad64 = _lower_for_cuda(lambda: jax.grad(loss, argnums=(0, 1))(q[..., :64], k[..., :64]))
    assert "jax_msa_dot_product_attention_fwd" in grad64 and "bwd_cuda" not in grad64
    f32 = q.astype(jnp.float32), k.astype(jnp.float32)
    assert "jax_msa_" not in _lower_for_cuda(lambda: jax_msa.dot_product_attention(*f32, f32[1]))
    with pytest.raises(jax_msa.NoKernelError, match="these inputs"):
        _lower_for_cuda(lambda: jax_msa.dot_product_attention(*f32, f32[1], implementation="kernel"))


@pytest.mark.skipif(not _ffi.has_kernel("jax_msa_indexer_scores", "cuda"),
                    reason="needs a build with the CUDA kernels (no GPU needed: lowering only)")
def test_cuda_indexer_lowers_to_its_kernels_where_they_apply():
    rng = np.random.default_rng(4)
    qi, ki = normal(rng, (1, 300, 2, 128), jnp.bfloat16), normal(rng, (1, 300, 128), jnp.bfloat16)
    text = _lower_for_cuda(lambda: jax_msa.indexer(qi, ki, topk=4, return_lse=True))
    for target in ("jax_msa_indexer_scores", "jax_msa_indexer_select", "jax_msa_selected_lse"):
        assert target in text
    assert "jax_msa_block_scores" in _lower_for_cuda(lambda: jax_msa.block_scores(qi, ki))
    f32 = qi.astype(jnp.float32), ki.astype(jnp.float32)
    assert "jax_msa_" not in _lower_for_cuda(lambda: jax_msa.indexer(*f32, topk=4))  # the reference
    with pytest.raises(jax_msa.NoKernelError, match="these inputs"):
        _lower_for_cuda(lambda: jax_msa.block_scores(*f32, implementation="kernel"))


def test_sparse_schedules_agree_and_are_checked():
    base = jax_msa.sparse_attention(Q, K, V, IDS)
    for schedule in ("query", "block"):
        np.testing.assert_array_equal(jax_msa.sparse_attention(Q, K, V, IDS, schedule=schedule), base)
    with pytest.raises(ValueError, match="schedule"):
        jax_msa.sparse_attention(Q, K, V, IDS, schedule="fast")


@pytest.mark.parametrize("implementation", ["auto", "reference"])
def test_implementations_agree(implementation):
    out = jax_msa.msa_attention(Q, K, V, QI, KI, topk=2, implementation=implementation)
    ref = reference.msa_attention(Q, K, V, QI, KI, topk=2)
    assert rel_err(out, ref) <= 2e-5


def test_vmap_matches_loop():
    q2, k2, v2 = (jnp.stack([x, x[::-1] * 0.5]) for x in (Q, K, V))
    ids2 = jnp.stack([IDS, IDS])
    ql = jnp.asarray([260, 100], jnp.int32)
    fn = lambda q, k, v, ids: jax_msa.sparse_attention(q, k, v, ids, q_lengths=ql, return_lse=True)
    out, lse = jax.jit(jax.vmap(fn))(q2, k2, v2, ids2)
    for i in range(2):
        o, l = fn(q2[i], k2[i], v2[i], ids2[i])
        np.testing.assert_allclose(out[i], o, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(lse[i], l)


def test_vmap_with_unbatched_operands():
    # k, v and the index keys are shared; only the queries are vmapped.
    qs, qis = jnp.stack([Q, -Q]), jnp.stack([QI, QI * 2])
    out = jax.vmap(lambda q, qi: jax_msa.msa_attention(q, K, V, qi, KI, topk=2))(qs, qis)
    for i in range(2):
        np.testing.assert_allclose(out[i], jax_msa.msa_attention(qs[i], K, V, qis[i], KI, topk=2), rtol=1e-6,
                                   atol=1e-6)
    scores = jax.vmap(lambda qi: jax_msa.block_scores(qi, KI))(qis)
    np.testing.assert_array_equal(scores[1], jax_msa.block_scores(qis[1], KI))
    ids = jax.vmap(lambda s: jax_msa.topk_select(s, topk=2))(jnp.stack([SCORES, -SCORES]))
    np.testing.assert_array_equal(ids[1], jax_msa.topk_select(-SCORES, topk=2))


def test_check_grads_sparse_attention():
    rng = np.random.default_rng(12)
    q, k, v = normal(rng, (1, 150, 2, 16)), normal(rng, (1, 150, 1, 16)), normal(rng, (1, 150, 1, 16))
    ids = jnp.asarray(np.broadcast_to(np.array([0, 1, -1], np.int32), (1, 150, 1, 3)))
    fn = lambda q, k, v: jax_msa.sparse_attention(q, k, v, ids, q_lengths=jnp.asarray([140]), implementation="kernel")
    check_grads(fn, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_check_grads_dot_product_attention(causal):
    rng = np.random.default_rng(13)
    q, k, v = normal(rng, (1, 40, 4, 16)), normal(rng, (1, 150, 2, 16)), normal(rng, (1, 150, 2, 16))
    fn = lambda q, k, v: jax_msa.dot_product_attention(q, k, v, causal=causal, kv_lengths=jnp.asarray([131]),
                                                       return_lse=True, implementation="kernel")
    check_grads(fn, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2)


def test_msa_attention_gradients_skip_the_indexer():
    gq, gqi = jax.grad(lambda q, qi: jax_msa.msa_attention(q, K, V, qi, KI, topk=2).sum(), argnums=(0, 1))(Q, QI)
    assert np.all(np.isfinite(gq)) and np.any(gq != 0)
    assert not np.any(gqi)


# Bad input: trace-time errors that name the argument. Length values are
# checked where they are concrete (here: closed over, not traced).
LONG_LENGTHS = jnp.asarray([300, 1])
SHORT_KV_LENGTHS = jnp.asarray([100, 260])
MID_LENGTHS = jnp.asarray([200, 200])

@pytest.mark.parametrize("call, error, match", [
    (lambda: jax_msa.sparse_attention(Q[0], K, V, IDS), ValueError, r"q must have rank 4"),
    (lambda: jax_msa.sparse_attention(Q, K[:, :100], V, IDS), ValueError, r"v has shape"),
    (lambda: jax_msa.sparse_attention(Q, K.astype(jnp.bfloat16), V, IDS), TypeError, r"k has dtype"),
    (lambda: jax_msa.sparse_attention(Q.astype(jnp.int32), K, V, IDS), TypeError, r"q has dtype"),
    (lambda: jax_msa.sparse_attention(Q[:, :, :3], K, V, IDS), ValueError, r"not a multiple"),
    (lambda: jax_msa.sparse_attention(Q, K, V, IDS[:, :10]), ValueError, r"ids has shape"),
    (lambda: jax_msa.sparse_attention(Q, K, V, IDS.astype(jnp.float32)), TypeError, r"ids must be an integer"),
    (lambda: jax_msa.sparse_attention(Q, K, V, jnp.zeros((B, S, HKV, 65), jnp.int32)), ValueError, r"topk"),
    (lambda: jax_msa.sparse_attention(Q[..., :12], K[..., :12], V[..., :12], IDS), ValueError, r"head dim 12"),
    (lambda: jax_msa.sparse_attention(Q, K, V, IDS, q_lengths=LONG_LENGTHS), ValueError,
     r"q_lengths must lie in \[0, 260\]"),
    (lambda: jax_msa.sparse_attention(Q, K, V, IDS, q_lengths=jnp.asarray([3])), ValueError, r"q_lengths has shape"),
    (lambda: jax_msa.dot_product_attention(Q, K, V, q_lengths=MID_LENGTHS,
                                           kv_lengths=SHORT_KV_LENGTHS), ValueError, r"kv_lengths must be >="),
    (lambda: jax_msa.dot_product_attention(Q, K, V, implementation="fast"), ValueError, r"implementation"),
    (lambda: jax_msa.indexer(QI, KI, topk=0), ValueError, r"topk must be"),
    (lambda: jax_msa.indexer(QI, KI[..., :16]), ValueError, r"ki has shape"),
    (lambda: jax_msa.block_scores(QI, KI[0]), ValueError, r"ki must have rank 3"),
    (lambda: jax_msa.topk_select(SCORES.astype(jnp.bfloat16)), TypeError, r"scores must be float32"),
    (lambda: jax_msa.topk_select(SCORES, kv_seq_len=1000), ValueError, r"kv_seq_len"),
    (lambda: jax_msa.msa_attention(Q, K, V, QI[:, :, :1], KI), ValueError, r"index heads"),
])
def test_bad_input_raises_at_trace_time(call, error, match):
    with pytest.raises(error, match=match):
        jax.jit(call).lower()


def test_lengths_checked_under_jit_only_by_shape():
    # Traced lengths cannot be checked by value; their shape still is.
    fn = jax.jit(lambda ql: jax_msa.dot_product_attention(Q, K, V, q_lengths=ql))
    with pytest.raises(ValueError, match="q_lengths has shape"):
        fn.lower(jnp.zeros((3,), jnp.int32))
    assert fn(jnp.asarray([260, 0], jnp.int32)).shape == Q.shape
