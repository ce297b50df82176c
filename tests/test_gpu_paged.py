"""paged_indexer on a GPU (skipped elsewhere): the CUDA kernels
(paged_indexer_scores -> indexer_select) against the float32 reference and
the CPU kernel on the same inputs."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_msa
from jax_msa import reference
from helpers import assert_same_selection, BLOCK, E4M3, first_gpu, GPU_ONLY, make_page_table, normal, quantise, to_pages

GPU = first_gpu()
pytestmark = GPU_ONLY
CPU = jax.devices("cpu")[0]
_SCORES_P = sys.modules["jax_msa.paged"]._scores_p


def _on(device, fn, *args):
    """Runs jit(fn) with its arguments on `device`; returns host arrays."""
    return jax.device_get(jax.jit(fn)(*jax.device_put(args, device)))


def _problem(seed, b, nq, hi, di, kv_lengths, max_pages, cache_dtype, qi_dtype=jnp.bfloat16, holes=0.0):
    """qi [B, Q, Hi, Di], a shuffled ki cache (NaN in every unused slot, so a
    kernel that reads one gives NaN), its page table and scale (!= 1 for every
    dtype: e4m3 is scaled to its range, 16-bit caches get 0.7)."""
    rng = np.random.default_rng(seed)
    kv = np.asarray(kv_lengths, np.int32)
    num_pages = int(sum(-(-kv // BLOCK))) + 5
    table = make_page_table(rng, kv, num_pages, max_pages, holes)
    ki = normal(rng, (b, max_pages * BLOCK, di))
    ki_cache, ki_scale = quantise(to_pages(ki, table, kv, num_pages), cache_dtype)
    return dict(qi=normal(rng, (b, nq, hi, di), qi_dtype), ki_cache=ki_cache,
                ki_scale=0.7 if cache_dtype != E4M3 else ki_scale, table=jnp.asarray(table), kv=jnp.asarray(kv))


def _index(device, p, q_lengths, implementation, **kw):
    fn = lambda qi, ki_cache, table, kv, ql: jax_msa.paged_indexer(
        qi, ki_cache, table, kv, ki_scale=p["ki_scale"], q_lengths=ql, implementation=implementation, **kw)
    return _on(device, fn, p["qi"], p["ki_cache"], p["table"], p["kv"], q_lengths)


def _check(p, q_lengths, **kw):
    """The GPU kernel selects the pages of the reference and of the CPU kernel."""
    ids = _index(GPU, p, q_lengths, "kernel", **kw)
    assert_same_selection(ids, _index(CPU, p, q_lengths, "reference", **kw))
    assert_same_selection(ids, _index(CPU, p, q_lengths, "kernel", **kw))
    return ids


# (B, Q, Hi, Di, cache, qi, kv_lengths, q_lengths, max_pages, topk, holes): decode,
# MTP and a prefill chunk; 1-4 m16 row tiles (Q * Hi up to 64) and several row
# chunks (Q * Hi = 200); unaligned lengths, padded queries, holes, every topk.
CASES = [
    (4, 1, 4, 128, jnp.bfloat16, jnp.bfloat16, [5000, 129, 1, 2000], None, 48, 16, 0.0),
    (3, 3, 1, 128, E4M3, jnp.bfloat16, [3000, 700, 300], [3, 2, 1], 30, 4, 0.2),
    (2, 8, 1, 64, jnp.bfloat16, jnp.bfloat16, [9000, 1000], [8, 5], 80, 64, 0.1),
    (2, 8, 4, 128, jnp.bfloat16, jnp.bfloat16, [7000, 3333], [8, 8], 60, 16, 0.0),
    (3, 16, 4, 128, E4M3, jnp.bfloat16, [20000, 4100, 777], [16, 9, 16], 160, 16, 0.1),
    (2, 16, 2, 64, jnp.float16, jnp.float16, [6000, 2500], None, 50, 1, 0.0),
    (2, 3, 4, 64, E4M3, jnp.float16, [4000, 1500], [3, 1], 40, 64, 0.3),
    (3, 16, 1, 128, jnp.float16, jnp.float16, [2100, 1000, 16], [16, 1, 16], 17, 4, 0.0),
    (1, 100, 2, 128, jnp.bfloat16, jnp.bfloat16, [3000], [100], 24, 16, 0.0),
    (2, 50, 4, 64, E4M3, jnp.bfloat16, [6400, 60], [50, 50], 51, 8, 0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}q{c[1]}h{c[2]}d{c[3]}-{jnp.dtype(c[4]).name}-"
                                                       f"{jnp.dtype(c[5]).name}-k{c[9]}")
def test_paged_indexer_kernel(case):
    b, nq, hi, di, cache_dtype, qi_dtype, kv, ql, max_pages, topk, holes = case
    p = _problem(40, b, nq, hi, di, kv, max_pages, cache_dtype, qi_dtype, holes)
    q_lengths = jnp.full((b,), nq, jnp.int32) if ql is None else jnp.asarray(ql, jnp.int32)
    fn = lambda qi, ki_cache: jax_msa.paged_indexer(qi, ki_cache, p["table"], p["kv"], topk=topk,
                                                    implementation="kernel")
    text = jax.jit(fn).lower(*jax.device_put((p["qi"], p["ki_cache"]), GPU)).as_text()
    assert "jax_msa_paged_indexer_scores" in text and "jax_msa_indexer_select" in text
    ids = _check(p, q_lengths, topk=topk)
    for row, n in enumerate(np.asarray(q_lengths)):  # padded queries select nothing
        assert np.all(ids[row, n:] == -1)


def _local_pages(q_lengths, kv_lengths, nq):
    """[B, Q] local page of each query (-1 for padded ones)."""
    q, kv = np.asarray(q_lengths)[:, None], np.asarray(kv_lengths)[:, None]
    t = np.arange(nq)[None, :]
    return np.where(t < q, (kv - q + t) // BLOCK, -1)


# The reference's NaN handling is not checked against the reference on the
# CPU: XLA:CPU's vectorised max reductions drop NaN (openxla/xla#21461), so
# NaN is checked against its definition instead.
@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, E4M3])
@pytest.mark.parametrize("scale", [None, -0.3])
def test_scores_kernel_matches_reference_scores(cache_dtype, scale):
    """The hidden scores step alone: every entry the selection reads (valid
    queries, pages before their local page) equals the reference's block max,
    -inf for holes, NaN for a page holding a NaN key; negative scales too."""
    b, nq, hi, di, max_pages = 3, 5, 3, 128, 40
    p = _problem(41, b, nq, hi, di, [5000, 2222, 300], max_pages, cache_dtype, holes=0.2)
    ki_cache, table = np.array(p["ki_cache"]), np.array(p["table"])
    # Logical page 7 of request 0 on a spare page of finite keys but one.
    spare = min(set(range(ki_cache.shape[0])) - set(table.ravel().tolist()))
    keys = 0.5 * np.random.default_rng(0).standard_normal((BLOCK, di)) / p["ki_scale"]
    ki_cache[spare] = keys.astype(ki_cache.dtype)
    ki_cache[spare, 77, 5] = np.nan
    table[0, 7] = spare
    q_lengths = jnp.asarray([5, 3, 0], jnp.int32)
    scale = di**-0.5 if scale is None else scale
    args = (jnp.asarray(ki_cache), jnp.float32(p["ki_scale"]), p["qi"], jnp.asarray(table), q_lengths, p["kv"])
    got, = _on(GPU, lambda *a: _SCORES_P.bind(*a, scale=np.float32(scale), implementation="kernel"), *args)
    want = _on(CPU, lambda k, s, qi, t, ql, kv: reference.paged_block_scores(qi, k, t, kv, ki_scale=s, q_lengths=ql,
                                                                              scale=scale), *args)
    read = np.arange(max_pages)[None, None, :] < _local_pages(q_lengths, p["kv"], nq)[:, :, None]
    read = np.broadcast_to(read[:, :, None, :], got.shape)
    nan_page = np.zeros(got.shape, bool)
    nan_page[0, ..., 7] = True
    np.testing.assert_array_equal(np.isnan(got[read]), nan_page[read])
    check = read & ~nan_page
    np.testing.assert_array_equal(np.isneginf(got[check]), np.isneginf(want[check]))
    finite = np.isfinite(want[check])
    np.testing.assert_allclose(got[check][finite], want[check][finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, E4M3])
def test_nan_keys_rank_like_minus_inf(cache_dtype):
    """A NaN key makes its page's score NaN, which the selection ranks like
    -inf: the selection is the reference's with those pages made holes."""
    p = _problem(42, 2, 4, 2, 64, [4000, 2600], 32, cache_dtype)
    ki_cache, holed = np.array(p["ki_cache"]), np.array(p["table"])
    for b, c in ((0, 3), (0, 20), (1, 0), (1, 5)):
        ki_cache[holed[b, c], 11, 7] = np.nan
        holed[b, c] = -1
    p["ki_cache"] = jnp.asarray(ki_cache)
    q_lengths = jnp.asarray([4, 2], jnp.int32)
    for topk in (4, 30):
        ids = _index(GPU, p, q_lengths, "kernel", topk=topk)
        assert_same_selection(ids, _index(CPU, p, q_lengths, "kernel", topk=topk))
        assert_same_selection(ids, _index(CPU, dict(p, table=jnp.asarray(holed)), q_lengths, "reference", topk=topk))


def test_hostile_tables_and_lengths():
    """Negative, >= num_pages and huge page-table entries; kv_lengths past the
    table's capacity, q_lengths past Q or negative, kv_lengths < q_lengths,
    all traced (so unchecked): the kernels clamp and skip like the reference
    and never read outside the cache (unused slots hold NaN). Relies on
    indexer_select clamping the lengths as the reference does (kv_len to
    max_pages * 128, negative positions to no page)."""
    p = _problem(43, 4, 6, 2, 128, [1500, 900, 400, 700], 12, jnp.bfloat16, holes=0.3)
    table = np.array(p["table"])
    table[0, 2], table[1, 0], table[2, 1] = 2**31 - 1, -(2**31), 2**30
    p["table"] = jnp.asarray(table)
    for kv, ql in (([1500, 900, 400, 700], [6, 6, 6, 6]), ([10**6, 2**31 - 1, 12 * BLOCK + 1, 3], [9, -3, 6, 6])):
        p["kv"] = jnp.asarray(kv, jnp.int32)
        _check(p, jnp.asarray(ql, jnp.int32), topk=4)


def test_traced_scale_jit_and_vmap():
    """ki_scale traced (the kernel reads it on the device); vmap over requests
    sharing one cache (folded into the batch) and over caches (one by one)."""
    p = _problem(44, 2, 2, 2, 128, [3000, 1100], 24, E4M3)
    fn = lambda qi, ki_cache, s: jax_msa.paged_indexer(qi, ki_cache, p["table"], p["kv"], topk=8, ki_scale=s,
                                                       implementation="kernel")
    ref = lambda qi, ki_cache, s: reference.paged_indexer(qi, ki_cache, p["table"], p["kv"], topk=8, ki_scale=s)
    qis, scale = jnp.stack([p["qi"], -p["qi"]]), jnp.float32(p["ki_scale"])
    got = _on(GPU, jax.vmap(fn, (0, None, None)), qis, p["ki_cache"], scale)
    for i in range(2):
        assert_same_selection(got[i], _on(CPU, ref, qis[i], p["ki_cache"], scale))
    caches = jnp.stack([p["ki_cache"], p["ki_cache"][::-1]])
    got = _on(GPU, jax.vmap(fn, (None, 0, None)), p["qi"], caches, scale)
    for i in range(2):
        assert_same_selection(got[i], _on(CPU, ref, p["qi"], caches[i], scale))


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, E4M3])
def test_decode_steps_in_scan(cache_dtype):
    """Steps of 4 new tokens inside lax.scan: write their index keys, select.
    Against the reference run step by step on the same caches."""
    b, hi, di, max_pages, steps, n = 3, 4, 128, 20, 4, 4
    rng = np.random.default_rng(45)
    kv0 = np.asarray([2300, 129, 1000], np.int32)
    num_pages = int(sum(-(-(kv0 + steps * n) // BLOCK))) + 3
    table = make_page_table(rng, kv0 + steps * n, num_pages, max_pages)
    cache, ki_scale = quantise(to_pages(normal(rng, (b, max_pages * BLOCK, di)), table, kv0, num_pages), cache_dtype)
    table = jnp.asarray(table)
    # New keys at half the range of the prefilled ones (within e4m3's range).
    xs = (normal(rng, (steps, b, n, hi, di), jnp.bfloat16), 0.5 * normal(rng, (steps, b, n, di)))

    def step(implementation, carry, x):
        cache, kv = carry
        qi, ki = x
        positions = kv[:, None] + jnp.arange(n)
        pages = jnp.take_along_axis(table, positions // BLOCK, axis=1)
        cache = cache.at[pages, positions % BLOCK].set((ki / ki_scale).astype(cache.dtype))
        kv = kv + n
        ids = jax_msa.paged_indexer(qi, cache, table, kv, topk=16, ki_scale=ki_scale, implementation=implementation)
        return (cache, kv), ids

    carry = (cache, jnp.asarray(kv0))
    ids = _on(GPU, lambda c, x: jax.lax.scan(functools.partial(step, "kernel"), c, x)[1], carry, xs)
    reference_step = jax.jit(functools.partial(step, "reference"))
    for t in range(steps):
        carry, want = jax.device_get(reference_step(*jax.device_put((carry, tuple(x[t] for x in xs)), CPU)))
        assert_same_selection(ids[t], want)
