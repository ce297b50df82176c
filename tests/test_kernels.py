"""The FFI kernels (implementation="kernel") against the pure-JAX reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_msa
from jax_msa import reference
from helpers import (TOLERANCES, adversarial_ids, assert_lse_close, assert_same_selection, normal,
                     random_lengths, rel_err)

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# (B, Sq, Sk, Hq, Hkv, D): unaligned lengths, chunked prefill (Sq < Sk), GQA 1/4/16.
ATTENTION_SHAPES = [
    (2, 300, 300, 4, 1, 64),
    (1, 77, 457, 4, 4, 128),
    (2, 130, 390, 16, 1, 64),
]

# (B, Sq, Sk, Hi, Di, topk)
INDEXER_SHAPES = [
    (2, 300, 300, 1, 128, 2),
    (2, 200, 1100, 2, 64, 4),
    (1, 129, 1500, 4, 128, 16),
]


def _index_inputs(seed, shape, dtype=jnp.float32):
    b, sq, sk, hi, di, topk = shape
    rng = np.random.default_rng(seed)
    q_lengths, kv_lengths = random_lengths(rng, b, sq, sk)
    return rng, normal(rng, (b, sq, hi, di), dtype), normal(rng, (b, sk, di), dtype), q_lengths, kv_lengths


@pytest.mark.parametrize("shape", INDEXER_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_scores(shape, dtype):
    _, qi, ki, ql, kl = _index_inputs(0, shape, dtype)
    got = jax.jit(functools.partial(jax_msa.block_scores, implementation="kernel"))(qi, ki, q_lengths=ql,
                                                                                   kv_lengths=kl)
    want = reference.block_scores(qi, ki, q_lengths=ql, kv_lengths=kl)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(np.asarray(want))
    np.testing.assert_allclose(np.asarray(got)[finite], np.asarray(want)[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", INDEXER_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_indexer(shape, dtype):
    _, qi, ki, ql, kl = _index_inputs(1, shape, dtype)
    topk = shape[-1]
    fn = jax.jit(functools.partial(jax_msa.indexer, topk=topk, return_lse=True, implementation="kernel"))
    ids, lse = fn(qi, ki, q_lengths=ql, kv_lengths=kl)
    ref_ids, ref_lse = reference.indexer(qi, ki, topk=topk, q_lengths=ql, kv_lengths=kl, return_lse=True)
    assert_same_selection(ids, ref_ids)
    assert_lse_close(lse, ref_lse, atol=2e-3 if dtype != jnp.float32 else 1e-4)
    # Without lse: the same ids.
    ids_only = jax_msa.indexer(qi, ki, topk=topk, q_lengths=ql, kv_lengths=kl, implementation="kernel")
    np.testing.assert_array_equal(ids_only, ids)


def test_indexer_ties_go_to_lower_ids():
    # Every block holds the same keys: all history blocks tie, the lowest ids win.
    rng = np.random.default_rng(2)
    block = normal(rng, (1, 128, 64))
    ki = jnp.tile(block, (1, 12, 1))
    qi = normal(rng, (1, ki.shape[1], 1, 64))
    ids = jax_msa.indexer(qi, ki, topk=4, implementation="kernel")
    ref = reference.indexer(qi, ki, topk=4)
    assert_same_selection(ids, ref)
    last_row = np.asarray(ids)[0, -1, 0]
    assert sorted(last_row[:3].tolist()) == [0, 1, 2] and last_row[3] == 11


@pytest.mark.parametrize("topk", [1, 3, 16, 64])
def test_topk_select_rule(topk):
    # Scores with ties, NaN and -inf; rows with L + 1 <= topk and padded rows.
    rng = np.random.default_rng(3)
    b, sq, sk, hi = 2, 1000, 1000, 2
    nb = -(-sk // 128)
    scores = rng.integers(0, 4, (b, sq, hi, nb)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = np.nan
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    scores = jnp.asarray(scores)
    ql, kl = jnp.asarray([1000, 611], jnp.int32), jnp.asarray([1000, 900], jnp.int32)
    ids = jax_msa.topk_select(scores, topk=topk, q_lengths=ql, kv_lengths=kl, implementation="kernel")
    ref = reference.topk_select(scores, topk=topk, q_lengths=ql, kv_lengths=kl)
    assert_same_selection(ids, ref)


def _attention_inputs(seed, shape, dtype):
    b, sq, sk, hq, hkv, d = shape
    rng = np.random.default_rng(seed)
    q_lengths, kv_lengths = random_lengths(rng, b, sq, sk)
    q, k, v = (normal(rng, s, dtype) for s in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))
    return rng, q, k, v, q_lengths, kv_lengths


def _selection(rng, q_lengths, kv_lengths, shape, topk=4):
    """Indexer ids made adversarial (see helpers.adversarial_ids)."""
    b, sq, sk, _, hkv, _ = shape
    qi, ki = normal(rng, (b, sq, hkv, 32)), normal(rng, (b, sk, 32))
    ids = reference.indexer(qi, ki, topk=topk, q_lengths=q_lengths, kv_lengths=kv_lengths)
    return adversarial_ids(rng, ids, kv_lengths)


def _check_forward(got, want, dtype):
    (out, lse), (ref_out, ref_lse) = got, want
    rtol, atol = TOLERANCES[dtype]
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert rel_err(out, ref_out) <= rtol, rel_err(out, ref_out)
    assert_lse_close(lse, ref_lse, atol)


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_attention_forward(shape, dtype):
    rng, q, k, v, ql, kl = _attention_inputs(4, shape, dtype)
    ids = _selection(rng, ql, kl, shape)
    fn = jax.jit(functools.partial(jax_msa.sparse_attention, return_lse=True, implementation="kernel"))
    got = fn(q, k, v, ids, q_lengths=ql, kv_lengths=kl)
    want = reference.sparse_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), ids,
                                      q_lengths=ql, kv_lengths=kl, return_lse=True)
    _check_forward(got, want, dtype)
    # Padded rows are zero / -inf.
    out, lse = got
    for b in range(q.shape[0]):
        assert not np.any(np.asarray(out[b, int(ql[b]):], np.float32))
        assert np.all(np.isneginf(np.asarray(lse[b, int(ql[b]):])))


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_dense_attention_forward(shape, dtype, causal):
    _, q, k, v, ql, kl = _attention_inputs(5, shape, dtype)
    fn = jax.jit(functools.partial(jax_msa.dot_product_attention, causal=causal, return_lse=True,
                                   implementation="kernel"))
    got = fn(q, k, v, q_lengths=ql, kv_lengths=kl)
    want = reference.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                           causal=causal, q_lengths=ql, kv_lengths=kl, return_lse=True)
    _check_forward(got, want, dtype)


def _loss(attention, q, k, v, weights):
    """Uses out and lse (finite entries) so both cotangents reach the backward."""
    out, lse = attention(q, k, v)
    w_out, w_lse = weights
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("op", ["sparse", "dense_causal", "dense"])
def test_attention_backward(shape, dtype, op):
    rng, q, k, v, ql, kl = _attention_inputs(6, shape, dtype)
    weights = (normal(rng, q.shape), normal(rng, q.shape[:3]))
    if op == "sparse":
        ids = _selection(rng, ql, kl, shape)
        make = lambda impl: lambda q, k, v: (jax_msa.sparse_attention(
            q, k, v, ids, q_lengths=ql, kv_lengths=kl, return_lse=True, implementation=impl))
    else:
        make = lambda impl: lambda q, k, v: jax_msa.dot_product_attention(
            q, k, v, causal=op == "dense_causal", q_lengths=ql, kv_lengths=kl, return_lse=True,
            implementation=impl)
    grads = jax.jit(jax.grad(functools.partial(_loss, make("kernel")), argnums=(0, 1, 2)))(q, k, v, weights)
    as32 = lambda x: x.astype(jnp.float32)
    ref = jax.grad(functools.partial(_loss, make("reference")), argnums=(0, 1, 2))(as32(q), as32(k), as32(v),
                                                                                   weights)
    rtol = 1e-4 if dtype == jnp.float32 else 3e-2
    for name, g, r in zip("qkv", grads, ref):
        assert g.dtype == dtype
        assert rel_err(g, r) <= rtol, (name, rel_err(g, r))


def test_msa_attention_matches_reference():
    rng = np.random.default_rng(7)
    b, s, hq, hkv, d = 2, 700, 8, 2, 64
    q, k, v = normal(rng, (b, s, hq, d)), normal(rng, (b, s, hkv, d)), normal(rng, (b, s, hkv, d))
    qi, ki = normal(rng, (b, s, hkv, 64)), normal(rng, (b, s, 64))
    ql, kl = jnp.asarray([700, 500], jnp.int32), jnp.asarray([700, 650], jnp.int32)
    out, ids = jax.jit(functools.partial(jax_msa.msa_attention, topk=3, return_ids=True, implementation="kernel"))(
        q, k, v, qi, ki, q_lengths=ql, kv_lengths=kl)
    ref_out, ref_ids = reference.msa_attention(q, k, v, qi, ki, topk=3, q_lengths=ql, kv_lengths=kl,
                                               return_ids=True)
    assert_same_selection(ids, ref_ids)
    assert rel_err(out, ref_out) <= 2e-5
