"""On a GPU (skipped elsewhere): every op runs there, kernel or fallback, and
agrees with the CPU kernels on the same inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_msa
from jax_msa import reference
from helpers import assert_lse_close, assert_same_selection, first_gpu, GPU_ONLY, normal, rel_err

GPU = first_gpu()
pytestmark = GPU_ONLY
CPU = jax.devices("cpu")[0]


def _inputs(dtype=jnp.bfloat16):
    rng = np.random.default_rng(21)
    b, s, hq, hkv, d = 2, 1000, 16, 1, 128
    arrays = dict(q=normal(rng, (b, s, hq, d), dtype), k=normal(rng, (b, s, hkv, d), dtype),
                  v=normal(rng, (b, s, hkv, d), dtype), qi=normal(rng, (b, s, hkv, 128), dtype),
                  ki=normal(rng, (b, s, 128), dtype))
    lengths = dict(q_lengths=jnp.asarray([1000, 613], jnp.int32), kv_lengths=jnp.asarray([1000, 777], jnp.int32))
    return arrays, lengths


def _on(device, fn, *args):
    """Runs jit(fn) with its arguments on `device`; returns host arrays."""
    return jax.device_get(jax.jit(fn)(*jax.device_put(args, device)))


def test_every_op_runs_on_gpu_like_on_cpu():
    a, lengths = _inputs()
    ops = {
        "indexer": lambda qi, ki: jax_msa.indexer(qi, ki, topk=4, return_lse=True, **lengths),
        "block_scores": lambda qi, ki: jax_msa.block_scores(qi, ki, **lengths),
    }
    for name, fn in ops.items():
        gpu, cpu = _on(GPU, fn, a["qi"], a["ki"]), _on(CPU, fn, a["qi"], a["ki"])
        if name == "indexer":
            assert_same_selection(gpu[0], cpu[0])
            assert_lse_close(gpu[1], cpu[1], 2e-3)
        else:
            np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)
    ids = _on(CPU, lambda qi, ki: jax_msa.indexer(qi, ki, topk=4, **lengths), a["qi"], a["ki"])
    attention = {
        "sparse": lambda q, k, v: jax_msa.sparse_attention(q, k, v, ids, return_lse=True, **lengths),
        "dense": lambda q, k, v: jax_msa.dot_product_attention(q, k, v, return_lse=True, **lengths),
        "msa": lambda q, k, v: (jax_msa.msa_attention(q, k, v, a["qi"], a["ki"], topk=4, **lengths),
                                jnp.full(q.shape[:3], -jnp.inf)),  # no lse: a constant to compare
    }
    for name, fn in attention.items():
        (g_out, g_lse), (c_out, c_lse) = _on(GPU, fn, a["q"], a["k"], a["v"]), _on(CPU, fn, a["q"], a["k"], a["v"])
        assert rel_err(g_out, c_out) <= 2e-2, name
        assert_lse_close(g_lse, c_lse, 2e-3)
        grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)[0].astype(jnp.float32) ** 2), argnums=(0, 1, 2))
        for g, c in zip(_on(GPU, grad, a["q"], a["k"], a["v"]), _on(CPU, grad, a["q"], a["k"], a["v"])):
            assert rel_err(g, c) <= 3e-2, name


@pytest.mark.parametrize("topk", [1, 4, 16, 64])
def test_topk_select_cuda_kernel(topk):
    rng = np.random.default_rng(22)
    scores = rng.integers(0, 6, (2, 3000, 4, 24)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.05] = np.nan
    scores = jnp.asarray(scores)
    ql, kl = jnp.asarray([3000, 1234], jnp.int32), jnp.asarray([3000, 2900], jnp.int32)
    fn = lambda s: jax_msa.topk_select(s, topk=topk, q_lengths=ql, kv_lengths=kl, implementation="kernel")
    assert "jax_msa_topk_select" in jax.jit(fn).lower(jax.device_put(scores, GPU)).as_text()
    got = _on(GPU, fn, scores)
    assert_same_selection(got, reference.topk_select(scores, topk=topk, q_lengths=ql, kv_lengths=kl))


# --------------------------------------------------------------------------- #
# The indexer kernels: block_scores and the fused indexer on CUDA, from both
# kernel families (kernel_family.h; the `kernel_family` fixture, conftest.py) on
# this card.
# --------------------------------------------------------------------------- #


# (B, Sq, Sk, Hi, Di, dtype, q_lengths, kv_lengths, topk): unaligned lengths,
# padded rows, chunked prefill (Sq < Sk), an empty row, decode, Hi 1/2/3/4,
# rows of more than 32 blocks.
INDEXER_CASES = [
    (1, 1000, 1000, 1, 128, jnp.bfloat16, None, None, 16),
    (2, 777, 1500, 2, 64, jnp.float16, [777, 300], [1500, 1000], 16),
    (2, 2048, 2048, 4, 128, jnp.bfloat16, [2048, 1999], [2048, 2047], 8),
    (1, 4096, 4096, 4, 128, jnp.bfloat16, None, None, 16),
    (3, 130, 4000, 1, 128, jnp.bfloat16, [130, 1, 0], [4000, 129, 55], 64),
    (2, 300, 300, 3, 64, jnp.bfloat16, [300, 257], [300, 299], 2),
    (2, 1, 5000, 4, 128, jnp.float16, [1, 1], [5000, 2], 16),
    (1, 2500, 2500, 2, 128, jnp.float16, None, None, 1),
    (1, 3000, 9000, 2, 128, jnp.bfloat16, [2999], [8800], 16),  # 71 blocks
]


def _indexer_inputs(case, seed=31):
    b, sq, sk, hi, di, dtype, ql, kl, topk = case
    rng = np.random.default_rng(seed)
    qi, ki = normal(rng, (b, sq, hi, di), dtype), normal(rng, (b, sk, di), dtype)
    lengths = dict(q_lengths=None if ql is None else jnp.asarray(ql, jnp.int32),
                   kv_lengths=None if kl is None else jnp.asarray(kl, jnp.int32))
    return qi, ki, lengths, topk


def _assert_selection_equivalent(ids, ref_ids, ref_scores, atol=1e-4):
    """Same selection as the reference, up to real near-ties (spec §4): rows
    whose sets differ must pick history blocks of the same scores (within
    atol), keep the local block last and the -1 padding; at most 0.1% of rows
    may differ."""
    ids, ref_ids, ref_scores = np.asarray(ids), np.asarray(ref_ids), np.asarray(ref_scores)
    assert ids.shape == ref_ids.shape and ids.dtype == np.int32
    count = (ref_ids >= 0).sum(-1)
    slots = np.arange(ref_ids.shape[-1])
    np.testing.assert_array_equal(ids >= 0, slots < count[..., None])
    last = np.maximum(count - 1, 0)[..., None]
    np.testing.assert_array_equal(np.take_along_axis(ids, last, -1), np.take_along_axis(ref_ids, last, -1))
    differ = np.any(np.sort(ids, -1) != np.sort(ref_ids, -1), axis=-1)
    assert differ.mean() <= 1e-3, f"{differ.sum()} of {differ.size} rows select other blocks"
    for index in zip(*np.nonzero(differ)):
        n = count[index] - 1  # history entries
        got = np.sort(ref_scores[index][ids[index][:n]])
        want = np.sort(ref_scores[index][ref_ids[index][:n]])
        np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=f"row {index}")
    return differ


def _lowered_for_gpu(fn, *args):
    return jax.jit(fn).lower(*jax.device_put(args, GPU)).as_text()


@pytest.mark.parametrize("case", INDEXER_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}h{c[3]}d{c[4]}")
def test_block_scores_cuda_kernel(case, kernel_family):
    qi, ki, lengths, _ = _indexer_inputs(case)
    fn = lambda qi, ki: jax_msa.block_scores(qi, ki, implementation="kernel", **lengths)
    assert "jax_msa_block_scores" in _lowered_for_gpu(fn, qi, ki)
    got = _on(GPU, fn, qi, ki)
    want = _on(CPU, lambda qi, ki: jax_msa.block_scores(qi, ki, **lengths), qi, ki)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", INDEXER_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}h{c[3]}d{c[4]}k{c[8]}")
def test_indexer_cuda_kernel(case, kernel_family):
    qi, ki, lengths, topk = _indexer_inputs(case)
    fn = lambda qi, ki: jax_msa.indexer(qi, ki, topk=topk, return_lse=True, implementation="kernel", **lengths)
    text = _lowered_for_gpu(fn, qi, ki)
    assert all(f"jax_msa_{op}" in text for op in ("indexer_scores", "indexer_select", "selected_lse"))
    ids, lse = _on(GPU, fn, qi, ki)
    ref_ids, ref_lse = _on(CPU, lambda qi, ki: jax_msa.indexer(qi, ki, topk=topk, return_lse=True, **lengths), qi, ki)
    ref_scores = _on(CPU, lambda qi, ki: jax_msa.block_scores(qi, ki, **lengths), qi, ki)
    differ = _assert_selection_equivalent(ids, ref_ids, ref_scores)
    assert_lse_close(np.where(differ, 0.0, lse), np.where(differ, 0.0, ref_lse), 2e-3)
    # Without lse: the same ids.
    only_ids = _on(GPU, lambda qi, ki: jax_msa.indexer(qi, ki, topk=topk, **lengths), qi, ki)
    np.testing.assert_array_equal(only_ids, ids)


def test_indexer_cuda_kernel_negative_scale(kernel_family):
    qi, ki, lengths, topk = _indexer_inputs(INDEXER_CASES[1])
    fn = lambda qi, ki: jax_msa.block_scores(qi, ki, scale=-0.3, **lengths)
    got, want = _on(GPU, fn, qi, ki), _on(CPU, fn, qi, ki)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype,di", [(jnp.float32, 128), (jnp.bfloat16, 96)])
def test_indexer_cuda_falls_back_where_no_kernel(dtype, di, kernel_family):
    """float32 inputs and head dims other than 64/128 run the reference on CUDA."""
    qi, ki, lengths, topk = _indexer_inputs((2, 700, 700, 2, di, dtype, [700, 500], [700, 650], 4))
    fn = lambda qi, ki: jax_msa.indexer(qi, ki, topk=topk, return_lse=True, **lengths)
    assert "jax_msa_indexer_scores" not in _lowered_for_gpu(fn, qi, ki)
    (ids, lse), (ref_ids, ref_lse) = _on(GPU, fn, qi, ki), _on(CPU, fn, qi, ki)
    assert_same_selection(ids, ref_ids)
    assert_lse_close(lse, ref_lse, 2e-3)
    scores = _on(GPU, lambda qi, ki: jax_msa.block_scores(qi, ki, **lengths), qi, ki)
    np.testing.assert_allclose(scores, _on(CPU, lambda qi, ki: jax_msa.block_scores(qi, ki, **lengths), qi, ki),
                               rtol=1e-4, atol=1e-4)


def test_indexer_cuda_kernel_under_vmap(kernel_family):
    qi, ki, lengths, topk = _indexer_inputs((2, 600, 600, 2, 128, jnp.bfloat16, None, None, 4))
    qi, ki = jnp.stack([qi, qi[::-1]]), jnp.stack([ki, ki[::-1]])
    fn = jax.vmap(lambda qi, ki: jax_msa.indexer(qi, ki, topk=topk))
    got, want = _on(GPU, fn, qi, ki), _on(CPU, fn, qi, ki)
    ref_scores = _on(CPU, jax.vmap(lambda qi, ki: jax_msa.block_scores(qi, ki)), qi, ki)
    _assert_selection_equivalent(got, want, ref_scores)


@pytest.mark.parametrize("topk", [1, 4, 16, 33, 64])
def test_indexer_select_kernel_matches_topk_select(topk):
    """The indexer's warp-per-row selection (which also serves topk_select on
    CUDA for rows of <= 1024 blocks) = the CPU kernel of topk_select and the
    CUDA one-CTA-per-row kernel (longer rows), slot for slot (ties, NaN, lengths)."""
    import sys
    select_p = sys.modules["jax_msa.indexer"]._indexer_select_p
    rng = np.random.default_rng(23)
    scores = rng.integers(0, 6, (2, 3000, 4, 24)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.05] = np.nan
    scores[rng.random(scores.shape) < 0.05] = -0.0
    wide = rng.standard_normal((1, 40, 2, 1500)).astype(np.float32)  # 1500 blocks: 47 per lane
    # Rows of <= 1024 blocks: random (the threshold path), few distinct values
    # and one lane (c % 32 == 0) holding the best blocks (more keys pass the
    # threshold than a warp gathers: the rounds path).
    long = rng.standard_normal((1, 128, 1, 1024)).astype(np.float32)  # L = 1023
    long[:, 40:80] = rng.integers(0, 3, long[:, 40:80].shape)
    long[:, 80:, :, ::32] += 10.0
    for s, ql, kl in ((scores, [3000, 1234], [3000, 2900]), (wide, [40], [191_900]),
                      (long, [128], [1024 * 128])):
        ql, kl = jnp.asarray(ql, jnp.int32), jnp.asarray(kl, jnp.int32)
        fn = lambda s: select_p.bind(s, ql, kl, topk=np.int64(topk), implementation="kernel")[0]
        want = lambda s: jax_msa.topk_select(s, topk=topk, q_lengths=ql, kv_lengths=kl, kv_seq_len=s.shape[-1] * 128,
                                             implementation="kernel")
        got = _on(GPU, fn, jnp.asarray(s))
        np.testing.assert_array_equal(got, _on(CPU, want, jnp.asarray(s)))
        np.testing.assert_array_equal(got, _on(GPU, want, jnp.asarray(s)))
