"""Paged inference: paged_attention and paged_indexer (kernels, reference, API)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_msa
from jax_msa import _ffi, reference
from helpers import (BLOCK, E4M3, adversarial_ids, assert_lse_close, assert_same_selection, make_page_table, normal,
                     quantise, rel_err, to_pages)


def kv_pages(x, table, kv_lengths, num_pages):
    """[B, S, Hkv, D] -> a KV cache [num_pages, Hkv, 128, D]."""
    return np.swapaxes(to_pages(x, table, kv_lengths, num_pages), 1, 2)


def dequantised(pages, scale):
    return jnp.asarray(pages, jnp.float32) * scale


def jitted(fn, **static):
    """jit(fn) with the given keyword arguments static (much faster than eager on CPU)."""
    return jax.jit(functools.partial(fn, **static))


# (B, Q, Hq, Hkv, D, kv_lengths, max_pages): decode, MTP, chunked prefill, GQA 1/4/16.
SHAPES = [
    (3, 1, 16, 1, 128, [1000, 129, 1], 9),
    (3, 4, 8, 2, 64, [700, 130, 4], 8),
    (2, 200, 4, 4, 32, [450, 200], 4),
]


def _problem(seed, shape, holes=0.0):
    b, nq, hq, hkv, d, kv_lengths, max_pages = shape
    rng = np.random.default_rng(seed)
    kv_lengths = np.asarray(kv_lengths, np.int32)
    num_pages = int(sum(-(-kv_lengths // BLOCK))) + 3
    table = make_page_table(rng, kv_lengths, num_pages, max_pages, holes)
    s = max_pages * BLOCK
    k, v = normal(rng, (b, s, hkv, d)), normal(rng, (b, s, hkv, d))
    return dict(rng=rng, q=normal(rng, (b, nq, hq, d)), k=k, v=v, table=table, kv=kv_lengths, num_pages=num_pages,
                k_pages=kv_pages(k, table, kv_lengths, num_pages), v_pages=kv_pages(v, table, kv_lengths, num_pages))


def _ids(p, topk=4):
    """Indexer ids of the contiguous data, made adversarial."""
    b, nq, _, d = p["q"].shape
    rng, kv = p["rng"], jnp.asarray(p["kv"])
    qi, ki = normal(rng, (b, nq, p["k"].shape[2], 32)), normal(rng, (b, p["k"].shape[1], 32))
    ids = jax.jit(functools.partial(reference.indexer, topk=topk))(qi, ki, q_lengths=jnp.full((b,), nq, jnp.int32),
                                                                   kv_lengths=kv)
    return adversarial_ids(rng, ids, kv)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparse", [False, True])
def test_paged_equals_contiguous(shape, sparse):
    """A shuffled page table gives the contiguous answer (float32, <= 1e-5)."""
    p = _problem(0, shape)
    ids = _ids(p) if sparse else None
    b, nq = p["q"].shape[:2]
    kv, ql = jnp.asarray(p["kv"]), jnp.full((b,), nq, jnp.int32)
    contiguous = dict(q_lengths=ql, kv_lengths=kv, return_lse=True, implementation="kernel")
    if sparse:
        want = jax_msa.sparse_attention(p["q"], p["k"], p["v"], ids, **contiguous)
    else:
        want = jax_msa.dot_product_attention(p["q"], p["k"], p["v"], **contiguous)
    for implementation in ("kernel", "reference"):
        out, lse = jitted(jax_msa.paged_attention, return_lse=True, out_dtype=jnp.float32,
                          implementation=implementation)(
            p["q"], jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]), jnp.asarray(p["table"]), kv, ids)
        assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
        assert rel_err(out, want[0]) <= 1e-5, (implementation, rel_err(out, want[0]))
        assert_lse_close(lse, want[1], 1e-5)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16, E4M3])
def test_paged_attention_matches_reference(shape, cache_dtype):
    """Holes inside the context, padded queries, hostile ids, bf16/fp8 caches."""
    p = _problem(1, shape, holes=0.25)
    b, nq = p["q"].shape[:2]
    ql = jnp.asarray([nq] + [max(1, nq // 2)] * (b - 1), jnp.int32)
    (k_cache, k_scale), (v_cache, v_scale) = quantise(p["k_pages"], cache_dtype), quantise(p["v_pages"], cache_dtype)
    args = (p["q"].astype(jnp.bfloat16), k_cache, v_cache, jnp.asarray(p["table"]), jnp.asarray(p["kv"]))
    kw = dict(k_scale=k_scale, v_scale=v_scale, q_lengths=ql)
    for ids in (None, _ids(p)):
        out, lse = jitted(jax_msa.paged_attention, implementation="kernel", out_dtype=jnp.float32,
                          return_lse=True)(*args, ids, **kw)
        want, want_lse = jitted(reference.paged_attention, out_dtype=jnp.float32, return_lse=True)(*args, ids, **kw)
        assert rel_err(out, want) <= 1e-5, rel_err(out, want)
        assert_lse_close(lse, want_lse, 1e-5)
        # Padded queries: zeros and -inf.
        for row in range(b):
            assert not np.any(np.asarray(out[row, int(ql[row]):])) and np.all(np.isneginf(lse[row, int(ql[row]):]))
        # The default bf16 output.
        out_bf16 = jitted(jax_msa.paged_attention, implementation="kernel")(*args, ids, **kw)
        assert out_bf16.dtype == jnp.bfloat16 and rel_err(out_bf16, want) <= 2e-2


@pytest.mark.parametrize("sparse", [False, True])
def test_fp8_cache_within_spec_of_unquantised(sparse):
    p = _problem(2, SHAPES[1])
    ids = _ids(p) if sparse else None
    (k8, ks), (v8, vs) = quantise(p["k_pages"], E4M3), quantise(p["v_pages"], E4M3)
    table, kv, q = jnp.asarray(p["table"]), jnp.asarray(p["kv"]), p["q"].astype(jnp.bfloat16)
    out = jitted(jax_msa.paged_attention, implementation="kernel")(q, k8, v8, table, kv, ids, k_scale=ks, v_scale=vs)
    ref = jitted(reference.paged_attention, out_dtype=jnp.float32)
    exact = ref(q, jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]), table, kv, ids)
    dequant = ref(q, dequantised(k8, ks), dequantised(v8, vs), table, kv, ids)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, dequant) <= 2e-2, rel_err(out, dequant)
    assert rel_err(out, exact) <= 6e-2, rel_err(out, exact)


def test_e4m3_values_are_decoded_exactly():
    # Every float8_e4m3fn bit pattern as a value row; one key per request, so
    # out = v * v_scale exactly (NaN patterns included).
    values = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), E4M3)
    v_cache = jnp.zeros((2, 1, BLOCK, 128), E4M3).at[:, 0, 0].set(values.reshape(2, 128))
    k_cache = jnp.zeros_like(v_cache)
    q = jnp.ones((2, 1, 1, 128), jnp.float32)
    out = jax_msa.paged_attention(q, k_cache, v_cache, jnp.asarray([[0], [1]], jnp.int32), jnp.asarray([1, 1]),
                                  v_scale=0.5, out_dtype=jnp.float32, implementation="kernel")
    np.testing.assert_array_equal(out.reshape(256), values.astype(jnp.float32) * 0.5)


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, E4M3])
@pytest.mark.parametrize("holes", [0.0, 0.3])
def test_paged_indexer(cache_dtype, holes):
    rng = np.random.default_rng(3)
    b, nq, hi, di, max_pages, topk = 3, 6, 2, 64, 12, 4
    kv = np.asarray([1500, 700, 6], np.int32)
    num_pages = 30
    table = make_page_table(rng, kv, num_pages, max_pages, holes)
    qi, ki = normal(rng, (b, nq, hi, di)), normal(rng, (b, max_pages * BLOCK, di))
    ki_cache, ki_scale = quantise(to_pages(ki, table, kv, num_pages), cache_dtype)
    ql = jnp.asarray([6, 3, 2], jnp.int32)
    args = (qi, ki_cache, jnp.asarray(table), jnp.asarray(kv))
    ids = jitted(jax_msa.paged_indexer, topk=topk, implementation="kernel")(*args, ki_scale=ki_scale, q_lengths=ql)
    assert_same_selection(ids, jitted(reference.paged_indexer, topk=topk)(*args, ki_scale=ki_scale, q_lengths=ql))
    if holes == 0.0 and cache_dtype == jnp.bfloat16:
        # The contiguous indexer on the same keys selects the same pages.
        contiguous = jax_msa.indexer(qi, ki.astype(jnp.bfloat16).astype(jnp.float32), topk=topk, q_lengths=ql, kv_lengths=jnp.asarray(kv))
        assert_same_selection(ids, contiguous)


def test_hostile_inputs_are_never_dereferenced():
    # Huge and negative page-table entries and ids everywhere; NaN in every
    # page no valid entry refers to; kv_lengths past the table's capacity
    # (traced, so unchecked): the kernels clamp and skip, like the reference.
    rng = np.random.default_rng(4)
    b, nq, hq, hkv, d, max_pages = 2, 3, 4, 1, 32, 3
    kv = np.asarray([300, 250], np.int32)
    table = make_page_table(rng, kv, 8, max_pages, holes=0.3)
    table[1, 0] = 2**30
    q = normal(rng, (b, nq, hq, d))
    k_cache = jnp.asarray(kv_pages(normal(rng, (b, max_pages * BLOCK, hkv, d)), table, kv, 8))
    ids = jnp.asarray(rng.choice([-(2**31), -1, 0, 1, 2, 3, 2**30, 2**31 - 1], (b, nq, hkv, 5)), jnp.int32)
    qi = normal(rng, (b, nq, 1, 32))
    ki_cache = jnp.asarray(to_pages(normal(rng, (b, max_pages * BLOCK, 32)), table, kv, 8))
    for kv_lengths in (kv, np.asarray([10**6, 2**31 - 1], np.int32)):
        lengths = jnp.asarray(kv_lengths)
        for sel in (None, ids):
            attend = lambda impl: jitted(jax_msa.paged_attention, out_dtype=jnp.float32, implementation=impl)(
                q, k_cache, k_cache, jnp.asarray(table), lengths, sel)
            out, want = attend("kernel"), attend("reference")
            if kv_lengths is kv:
                assert np.all(np.isfinite(out))
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        select = lambda impl: jitted(jax_msa.paged_indexer, topk=2, implementation=impl)(
            qi, ki_cache, jnp.asarray(table), lengths)
        assert_same_selection(select("kernel"), select("reference"))


def _write(cache, table, positions, values):
    """cache [P, H, 128, D] (or [P, 128, D]) with values [B, n, H, D] ([B, n, D])
    written at the logical `positions` [B, n]."""
    pages = jnp.take_along_axis(table, positions // BLOCK, axis=1)
    if cache.ndim == 4:
        return cache.at[pages, :, positions % BLOCK].set(values.astype(cache.dtype))
    return cache.at[pages, positions % BLOCK].set(values.astype(cache.dtype))


def test_decode_loop_in_scan():
    # Prefilled caches, then 3 steps of 2 new tokens inside lax.scan: index,
    # attend sparse and dense. Against the reference run step by step.
    rng = np.random.default_rng(5)
    b, hq, hkv, d, di, max_pages, steps, n = 2, 4, 1, 32, 32, 4, 3, 2
    kv0 = np.asarray([250, 127], np.int32)
    table = jnp.asarray(make_page_table(rng, kv0 + steps * n, 10, max_pages))
    caches = (jnp.asarray(kv_pages(normal(rng, (b, max_pages * BLOCK, hkv, d)), table, kv0, 10), jnp.bfloat16),
              jnp.asarray(kv_pages(normal(rng, (b, max_pages * BLOCK, hkv, d)), table, kv0, 10), jnp.bfloat16),
              jnp.asarray(to_pages(normal(rng, (b, max_pages * BLOCK, di)), table, kv0, 10), jnp.bfloat16))
    xs = (normal(rng, (steps, b, n, hq, d)), normal(rng, (steps, b, n, hkv, d)), normal(rng, (steps, b, n, hkv, d)),
          normal(rng, (steps, b, n, hkv, di)), normal(rng, (steps, b, n, di)))

    def step(implementation, carry, x):
        (k_cache, v_cache, ki_cache), kv = carry
        q, k, v, qi, ki = x
        positions = kv[:, None] + jnp.arange(n)
        caches = tuple(_write(c, table, positions, val) for c, val in zip((k_cache, v_cache, ki_cache), (k, v, ki)))
        kv = kv + n
        ids = jax_msa.paged_indexer(qi, caches[2], table, kv, topk=2, implementation=implementation)
        sparse = jax_msa.paged_attention(q, caches[0], caches[1], table, kv, ids, implementation=implementation)
        dense = jax_msa.paged_attention(q, caches[0], caches[1], table, kv, implementation=implementation)
        return (caches, kv), (ids, sparse, dense)

    carry = (caches, jnp.asarray(kv0))
    _, (ids, sparse, dense) = jax.jit(lambda c, x: jax.lax.scan(functools.partial(step, "kernel"), c, x))(carry, xs)
    reference_step = jax.jit(functools.partial(step, "reference"))
    for t in range(steps):
        carry, (want_ids, want_sparse, want_dense) = reference_step(carry, tuple(x[t] for x in xs))
        assert_same_selection(ids[t], want_ids)
        assert rel_err(sparse[t], want_sparse) <= 1e-2 and rel_err(dense[t], want_dense) <= 1e-2


# Small inputs for the API tests.
_API = _problem(6, (2, 3, 4, 2, 32, [300, 100], 3))
_ARGS = (_API["q"], jnp.asarray(_API["k_pages"]), jnp.asarray(_API["v_pages"]), jnp.asarray(_API["table"]),
         jnp.asarray(_API["kv"]))
_IDS = _ids(_API, topk=2)
_QI = normal(np.random.default_rng(7), (2, 3, 2, 32))
_KI_CACHE = jnp.asarray(to_pages(normal(np.random.default_rng(8), (2, 3 * BLOCK, 32)), _API["table"], _API["kv"],
                                 _API["num_pages"]))
_INDEX_ARGS = (_QI, _KI_CACHE, _ARGS[3], _ARGS[4])


@pytest.mark.parametrize("fn, target", [
    (lambda: jax_msa.paged_attention(*_ARGS), "jax_msa_paged_attention"),
    (lambda: jax_msa.paged_attention(*_ARGS, _IDS), "jax_msa_paged_attention"),
    (lambda: jax_msa.paged_indexer(*_INDEX_ARGS, topk=2), "jax_msa_paged_indexer"),
])
def test_lowering_contains_custom_call(fn, target):
    assert f"@{target}(" in jax.jit(fn).lower().as_text()


def _cuda_lowering(fn):
    return jax.jit(fn).trace().lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.skipif(_ffi.has_kernel("jax_msa_paged_attention", "cuda"),
                    reason="checks the fallback of an op without a CUDA kernel")
def test_cuda_lowering_falls_back_to_reference():
    assert "jax_msa_paged" not in _cuda_lowering(lambda: jax_msa.paged_attention(*_ARGS, _IDS))


@pytest.mark.parametrize("qi_dtype, cache_dtype, di", [
    (jnp.bfloat16, jnp.bfloat16, 128), (jnp.bfloat16, E4M3, 64), (jnp.float16, jnp.float16, 64),
    (jnp.float16, E4M3, 128), (jnp.float32, jnp.float32, 128), (jnp.bfloat16, jnp.float16, 128),
    (jnp.bfloat16, jnp.bfloat16, 32)])
def test_paged_indexer_cuda_lowering(qi_dtype, cache_dtype, di):
    """paged_indexer_scores -> indexer_select where the CUDA kernels take the
    inputs (16-bit qi, Di 64/128, a cache of qi's dtype or e4m3), the reference
    elsewhere and in builds without them."""
    qi, ki_cache = jnp.zeros((2, 3, 2, di), qi_dtype), jnp.zeros((7, BLOCK, di), cache_dtype)
    text = _cuda_lowering(lambda: jax_msa.paged_indexer(qi, ki_cache, *_INDEX_ARGS[2:], topk=2))
    kernel = (_ffi.has_kernel("jax_msa_paged_indexer_scores", "cuda") and qi_dtype != jnp.float32
              and cache_dtype in (qi_dtype, E4M3) and di in (64, 128))
    assert ("@jax_msa_paged_indexer_scores(" in text) == kernel
    assert ("@jax_msa_indexer_select(" in text) == kernel
    assert "@jax_msa_paged_indexer(" not in text


def test_vmap():
    q, k_cache, v_cache, table, kv = _ARGS
    attend = lambda q, k_cache, ids, s: jax_msa.paged_attention(q, k_cache, v_cache, table, kv, ids, k_scale=s,
                                                                 out_dtype=jnp.float32)
    qs, ids, caches, scales = jnp.stack([q, -q]), jnp.stack([_IDS, _IDS[:, ::-1]]), jnp.stack([k_cache, -k_cache]), \
        jnp.asarray([0.5, 2.0])
    # Requests vmapped over one shared cache; then a vmapped cache and scale.
    for in_axes, args in (((0, None, 0, None), (qs, k_cache, ids, 1.0)), ((0, 0, None, 0), (qs, caches, _IDS, scales))):
        got = jax.jit(jax.vmap(attend, in_axes))(*args)
        for i in range(2):
            member = [a if axis is None else a[i] for a, axis in zip(args, in_axes)]
            np.testing.assert_allclose(got[i], attend(*member), rtol=1e-6, atol=1e-6)
    qi_s = jnp.stack([_QI, 2 * _QI[:, ::-1]])
    got = jax.vmap(lambda qi: jax_msa.paged_indexer(qi, *_INDEX_ARGS[1:], topk=2))(qi_s)
    np.testing.assert_array_equal(got[1], jax_msa.paged_indexer(qi_s[1], *_INDEX_ARGS[1:], topk=2))


def test_traced_scales_and_lengths():
    q, k_cache, v_cache, table, kv = _ARGS
    fn = jax.jit(lambda s, kv: jax_msa.paged_attention(q, k_cache, v_cache, table, kv, k_scale=s, v_scale=s))
    want = jax_msa.paged_attention(q, k_cache * 0.5, v_cache * 0.5, table, kv)
    np.testing.assert_array_equal(fn(jnp.float32(0.5), kv), want)


_BAD = dict(zip("q k v table kv".split(), _ARGS))


def _call(**changes):
    a = {**_BAD, **{n: x for n, x in changes.items() if n in _BAD}}
    kw = {n: x for n, x in changes.items() if n not in _BAD}
    return lambda: jax_msa.paged_attention(a["q"], a["k"], a["v"], a["table"], a["kv"], **kw)


@pytest.mark.parametrize("call, error, match", [
    (_call(q=_ARGS[0][0]), ValueError, r"q must have rank 4"),
    (_call(k=_ARGS[1][:, :, :64]), ValueError, r"k_cache has shape \(7, 2, 64, 32\), expected \(7, 2, 128, 32\)"),
    (_call(v=_ARGS[2][:5]), ValueError, r"v_cache has shape"),
    (_call(k=_ARGS[1].astype(jnp.int8)), TypeError, r"k_cache has dtype int8"),
    (_call(q=_ARGS[0][:, :, :3]), ValueError, r"not a multiple"),
    (_call(table=_ARGS[3][:1]), ValueError, r"page_table has shape"),
    (_call(table=_ARGS[3].astype(jnp.float32)), TypeError, r"page_table must be an integer"),
    (_call(kv=jnp.asarray([300, 400])), ValueError, r"kv_lengths must lie in \[0, 384\]"),
    (_call(kv=jnp.asarray([2, 100])), ValueError, r"kv_lengths must be >= q_lengths"),
    (_call(ids=_IDS[:, :, :1]), ValueError, r"ids has shape"),
    (_call(ids=_IDS.astype(jnp.float32)), TypeError, r"ids must be an integer"),
    (_call(k_scale=jnp.ones(2)), ValueError, r"k_scale must be a scalar"),
    (_call(out_dtype=jnp.int32), TypeError, r"out_dtype"),
    (_call(implementation="fast"), ValueError, r"implementation"),
    (lambda: jax_msa.paged_indexer(*_INDEX_ARGS, topk=65), ValueError, r"topk must be"),
    (lambda: jax_msa.paged_indexer(_QI, _KI_CACHE[..., :16], *_INDEX_ARGS[2:]), ValueError, r"ki_cache has shape"),
    (lambda: jax_msa.paged_indexer(_QI, _KI_CACHE, *_INDEX_ARGS[2:], ki_scale=jnp.ones((1, 1))), ValueError,
     r"ki_scale must be a scalar"),
])
def test_bad_input_raises_at_trace_time(call, error, match):
    with pytest.raises(error, match=match):
        jax.jit(call).lower()
