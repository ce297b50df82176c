"""Tests of jax_msa.reference against an independent NumPy float64 implementation.

The NumPy oracle below is written with plain loops, directly from MSA_SPEC.md
(positions, visibility, the selection rule, softmax and its gradient), and
shares no code with the module under test.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_msa import reference as R

BK = 128
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)

# The ops under test, each call compiled with jax.jit (much faster on CPU than
# op-by-op dispatch); lengths are traced, the other keyword arguments static.
# Eager calls are covered by test_jit.
def _jitted(fn):
    def call(*args, **kw):
        dyn = {n: x for n, x in kw.items() if n in ("q_lengths", "kv_lengths")}
        static = {n: x for n, x in kw.items() if n not in dyn}
        return jax.jit(functools.partial(fn, **static))(*args, **dyn)

    return call


block_scores = _jitted(R.block_scores)
topk_select = _jitted(R.topk_select)
indexer = _jitted(R.indexer)
sparse_attention = _jitted(R.sparse_attention)
dot_product_attention = _jitted(R.dot_product_attention)
msa_attention = _jitted(R.msa_attention)



# --------------------------------------------------------------------------- #
# NumPy float64 oracle
# --------------------------------------------------------------------------- #
def np_lengths(lengths, batch, full):
    if lengths is None:
        return np.full(batch, full, np.int64)
    return np.asarray(lengths, np.int64)


def np_pos(b, i, q_len, kv_len):
    return int(kv_len[b] - q_len[b] + i)


def np_block_scores(qi, ki, q_len, kv_len, scale=None):
    qi = np.asarray(qi, np.float64)
    ki = np.asarray(ki, np.float64)
    B, Sq, Hi, Di = qi.shape
    Sk = ki.shape[1]
    scale = Di**-0.5 if scale is None else scale
    nb = math.ceil(Sk / BK)
    out = np.full((B, Sq, Hi, nb), -np.inf)
    for b in range(B):
        for i in range(q_len[b]):
            n_vis = min(np_pos(b, i, q_len, kv_len) + 1, kv_len[b])  # keys 0..n_vis-1
            s = scale * qi[b, i] @ ki[b, :n_vis].T  # [Hi, n_vis]
            for c in range(math.ceil(n_vis / BK)):
                out[b, i, :, c] = s[:, c * BK : (c + 1) * BK].max(axis=-1)
    return out


def np_select_row(row_scores, L, topk):
    """Selection rule for one query: list of topk ids (exact order)."""
    if L + 1 <= topk:
        return list(range(L + 1)) + [-1] * (topk - L - 1)

    def key(c):
        s = float(row_scores[c])
        if math.isnan(s):
            s = -math.inf
        return (-s, c)  # descending score, then lower id

    return sorted(range(L), key=key)[: topk - 1] + [L]


def np_topk_select(scores, topk, q_len, kv_len):
    B, Sq, H, _ = scores.shape
    ids = np.full((B, Sq, H, topk), -1, np.int64)
    for b in range(B):
        for i in range(q_len[b]):
            L = np_pos(b, i, q_len, kv_len) // BK
            for h in range(H):
                ids[b, i, h] = np_select_row(scores[b, i, h], L, topk)
    return ids


def np_sparse_keys(ids, q_len, kv_len):
    """Key set of (b, i, g) for sparse attention, straight from spec 3.4."""

    def keys(b, i, g):
        if i >= q_len[b]:
            return None
        p = np_pos(b, i, q_len, kv_len)
        usable = math.ceil(kv_len[b] / BK)
        out = []
        for c in ids[b, i, g]:
            c = int(c)
            if 0 <= c < usable:
                out.extend(j for j in range(c * BK, (c + 1) * BK) if j <= p and j < kv_len[b])
        return np.asarray(out, np.int64)

    return keys


def np_dense_keys(q_len, kv_len, causal):
    def keys(b, i, g):
        if i >= q_len[b]:
            return None
        n = kv_len[b]
        if causal:
            n = min(n, np_pos(b, i, q_len, kv_len) + 1)
        return np.arange(n)

    return keys


def np_attention(q, k, v, keys_fn, scale=None, dout=None, dlse=None):
    """Float64 attention over explicit key sets, with optional analytic backward.

    Backward of L = sum(out * dout) + sum(lse * dlse) (dlse only where lse is
    finite). Returns out, lse[, dq, dk, dv].
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    out = np.zeros((B, Sq, Hq, D))
    lse = np.full((B, Sq, Hq), -np.inf)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(B):
        for i in range(Sq):
            for g in range(Hkv):
                keys = keys_fn(b, i, g)
                if keys is None or len(keys) == 0:
                    continue
                hs = slice(g * G, (g + 1) * G)
                qh = q[b, i, hs]  # [G, D]
                K, V = k[b, keys, g], v[b, keys, g]  # [n, D]
                s = scale * qh @ K.T
                m = s.max(axis=-1, keepdims=True)
                e = np.exp(s - m)
                l = e.sum(axis=-1, keepdims=True)
                P = e / l
                out[b, i, hs] = P @ V
                lse[b, i, hs] = (m + np.log(l))[:, 0]
                if dout is not None:
                    dO = np.asarray(dout[b, i, hs], np.float64)
                    dl = np.zeros(G) if dlse is None else np.asarray(dlse[b, i, hs], np.float64)
                    dv[b, keys, g] += P.T @ dO
                    dP = dO @ V.T
                    dS = P * (dP - (P * dP).sum(-1, keepdims=True)) + P * dl[:, None]
                    dq[b, i, hs] = scale * dS @ K
                    dk[b, keys, g] += scale * dS.T @ qh
    if dout is None:
        return out, lse
    return out, lse, dq, dk, dv


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    fin = np.isfinite(expected)
    assert np.all(np.isfinite(actual[fin]))
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=rtol, atol=atol)


def normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def make_sparse_ids(rng, B, Sq, Hkv, topk, q_len, kv_len, Sk):
    """Distinct ids per row mixing visible, local and future blocks with ids
    outside [0, ceil(kv_len/128)): beyond kv_len but inside the array, >= nb,
    huge, negative; shuffled. Some rows get no usable id at all."""
    nb = math.ceil(Sk / BK)
    ids = np.full((B, Sq, Hkv, topk), -1, np.int64)
    for b in range(B):
        usable = math.ceil(kv_len[b] / BK)
        bad_pool = np.array(
            list(range(usable, nb + 2)) + [1000, 2**30, INT32_MAX, -2, -7, INT32_MIN]
        )
        for i in range(Sq):
            for g in range(Hkv):
                n_ok = int(rng.integers(0, min(topk, usable) + 1))
                ok = rng.choice(usable, n_ok, replace=False)
                n_bad = int(rng.integers(0, topk - n_ok + 1))
                bad = rng.choice(bad_pool, min(n_bad, len(bad_pool)), replace=False)
                row = np.concatenate([ok, bad])
                ids[b, i, g, : len(row)] = row
                rng.shuffle(ids[b, i, g])
    return ids.astype(np.int32)


# (Sq, Sk, q_lengths, kv_lengths)
SHAPES = [
    (300, 300, None, None),
    (200, 457, [200, 131], [457, 390]),
    (300, 300, [300, 257], [300, 280]),
]
HEADS = [(4, 1), (4, 4), (16, 1)]


def _lens(q_lengths, kv_lengths, B, Sq, Sk):
    return np_lengths(q_lengths, B, Sq), np_lengths(kv_lengths, B, Sk)


def _jlens(x):
    return None if x is None else jnp.asarray(x, jnp.int32)


# --------------------------------------------------------------------------- #
# block_scores
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hi", [1, 4])
def test_block_scores(shape, hi):
    Sq, Sk, ql, kl = shape
    B, Di = 2, 32
    rng = np.random.default_rng(1)
    qi, ki = normal(rng, (B, Sq, hi, Di)), normal(rng, (B, Sk, Di))
    got = block_scores(qi, ki, q_lengths=_jlens(ql), kv_lengths=_jlens(kl))
    assert got.dtype == jnp.float32 and got.shape == (B, Sq, hi, math.ceil(Sk / BK))
    q_len, kv_len = _lens(ql, kl, B, Sq, Sk)
    assert_close(got, np_block_scores(qi, ki, q_len, kv_len), rtol=1e-5, atol=1e-5)


def test_block_scores_scale():
    rng = np.random.default_rng(2)
    qi, ki = normal(rng, (2, 130, 2, 16)), normal(rng, (2, 260, 16))
    got = block_scores(qi, ki, scale=0.37)
    n = np.array([130, 130]), np.array([260, 260])
    assert_close(got, np_block_scores(qi, ki, *n, scale=0.37), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# topk_select
# --------------------------------------------------------------------------- #
def _check_topk(scores, topk, ql=None, kl=None, kv_seq_len=None):
    B, Sq = scores.shape[:2]
    got = topk_select(
        jnp.asarray(scores), topk=topk, q_lengths=_jlens(ql), kv_lengths=_jlens(kl),
        kv_seq_len=kv_seq_len,
    )
    assert got.dtype == jnp.int32 and got.shape == scores.shape[:3] + (topk,)
    q_len = np_lengths(ql, B, Sq)
    kv_len = np_lengths(kl, B, Sq if kv_seq_len is None else kv_seq_len)
    np.testing.assert_array_equal(np.asarray(got), np_topk_select(scores, topk, q_len, kv_len))
    return np.asarray(got)


@pytest.mark.parametrize("topk", [1, 2, 8, 16])
def test_topk_select_random_long_context(topk):
    rng = np.random.default_rng(3)
    Sq, Sk = 300, 3000  # mostly L + 1 > topk
    scores = normal(rng, (2, Sq, 2, math.ceil(Sk / BK)))
    got = _check_topk(scores, topk, [300, 170], [3000, 2100], kv_seq_len=Sk)
    assert np.all(got[1, 170:] == -1)


@pytest.mark.parametrize("topk", [2, 4])
def test_topk_select_self_attention_mixed(topk):
    rng = np.random.default_rng(4)
    Sq = 700  # kv default: Sq; L = 0..5, both sides of L + 1 <= topk
    scores = normal(rng, (2, Sq, 3, math.ceil(Sq / BK)))
    _check_topk(scores, topk, [700, 520], [700, 650])
    L = (np.arange(700) // BK)[:, None]
    few = L + 1 <= topk
    assert few.any() and (~few).any()


def test_topk_select_topk_larger_than_blocks():
    rng = np.random.default_rng(5)
    scores = normal(rng, (2, 300, 2, 3))
    got = _check_topk(scores, 16, [300, 100], [300, 290])
    assert np.all(got[..., 3:] == -1)


def test_topk_select_ties():
    rng = np.random.default_rng(6)
    Sq, Sk = 260, 2600
    scores = rng.integers(-1, 2, (2, Sq, 2, math.ceil(Sk / BK))).astype(np.float32)
    # Mix +0.0 and -0.0: they are equal scores, so the lower id must win.
    zeros = scores == 0
    scores[zeros & (rng.random(scores.shape) < 0.5)] = -0.0
    _check_topk(scores, 8, kv_seq_len=Sk)
    _check_topk(scores, 5, [260, 77], [2600, 1900], kv_seq_len=Sk)


def test_topk_select_nan_and_inf():
    rng = np.random.default_rng(7)
    Sq, Sk = 256, 3000
    nb = math.ceil(Sk / BK)
    scores = normal(rng, (2, Sq, 2, nb))
    scores[rng.random(scores.shape) < 0.3] = np.nan
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    scores[rng.random(scores.shape) < 0.05] = np.inf
    scores[0, :50, 0, :] = np.nan  # whole rows of NaN: lowest ids win
    scores[0, 50:100, 1, :] = -np.inf
    got = _check_topk(scores, 8, kv_seq_len=Sk)
    # A NaN (or -inf) score never beats a score above -inf.
    checked = 0
    for b in range(2):
        for i in range(Sq):
            for h in range(2):
                row, L = scores[b, i, h], got[b, i, h, -1]
                good = lambda c: row[c] > -np.inf  # False for NaN and -inf
                if sum(good(c) for c in range(L)) >= 7:
                    assert all(good(c) for c in got[b, i, h, :-1])
                    checked += 1
    assert checked > 100
    assert got[0, 10, 0, :-1].tolist() == list(range(7))


def test_topk_select_padded_rows_and_jit():
    rng = np.random.default_rng(8)
    scores = normal(rng, (2, 300, 2, 24))
    fn = jax.jit(functools.partial(R.topk_select, topk=8, kv_seq_len=3000))
    got = fn(scores, q_lengths=jnp.array([12, 0], jnp.int32), kv_lengths=jnp.array([3000, 1000], jnp.int32))
    exp = np_topk_select(scores, 8, np.array([12, 0]), np.array([3000, 1000]))
    np.testing.assert_array_equal(np.asarray(got), exp)
    assert np.all(np.asarray(got)[0, 12:] == -1) and np.all(np.asarray(got)[1] == -1)


# --------------------------------------------------------------------------- #
# indexer
# --------------------------------------------------------------------------- #
def np_index_lse(qi, ki, ids, q_len, kv_len):
    """logsumexp of index logits over visible keys of the selected blocks."""
    Di = qi.shape[-1]
    keys = np_sparse_keys(ids, q_len, kv_len)
    B, Sq, Hi, _ = qi.shape
    lse = np.full((B, Sq, Hi), -np.inf)
    for b in range(B):
        for i in range(Sq):
            for h in range(Hi):
                ks = keys(b, i, h)
                if ks is None or len(ks) == 0:
                    continue
                s = Di**-0.5 * np.asarray(ki[b, ks], np.float64) @ np.asarray(qi[b, i, h], np.float64)
                m = s.max()
                lse[b, i, h] = m + np.log(np.exp(s - m).sum())
    return lse


INDEXER_CASES = [
    # Sq, Sk, q_lengths, kv_lengths, Hi, topk
    (300, 300, None, None, 1, 2),
    (200, 457, [200, 131], [457, 390], 4, 2),
    (200, 1100, [200, 90], [1100, 700], 2, 4),
    (300, 300, [300, 257], [300, 280], 2, 16),
]


@pytest.mark.parametrize("case", INDEXER_CASES)
def test_indexer(case):
    Sq, Sk, ql, kl, hi, topk = case
    B, Di = 2, 32
    rng = np.random.default_rng(9)
    qi, ki = normal(rng, (B, Sq, hi, Di)), normal(rng, (B, Sk, Di))
    q_len, kv_len = _lens(ql, kl, B, Sq, Sk)
    ids, lse = indexer(qi, ki, topk=topk, q_lengths=_jlens(ql), kv_lengths=_jlens(kl), return_lse=True)
    ids = np.asarray(ids)
    assert ids.dtype == np.int32 and ids.shape == (B, Sq, hi, topk)
    assert lse.dtype == jnp.float32 and lse.shape == (B, Sq, hi)

    exp_ids = np_topk_select(np_block_scores(qi, ki, q_len, kv_len), topk, q_len, kv_len)
    for b in range(B):
        for i in range(Sq):
            L = np_pos(b, i, q_len, kv_len) // BK
            for h in range(hi):
                row, exp = ids[b, i, h], exp_ids[b, i, h]
                if i >= q_len[b]:
                    assert np.all(row == -1)
                    continue
                valid = row[row >= 0]
                assert np.all(row[len(valid):] == -1)  # padding after the valid ids
                assert valid[-1] == L  # local block is the last valid entry
                assert set(valid.tolist()) == set(exp[exp >= 0].tolist())
    # Same selection (order included) as the two-step path.
    two_step = topk_select(
        block_scores(qi, ki, q_lengths=_jlens(ql), kv_lengths=_jlens(kl)),
        topk=topk, q_lengths=_jlens(ql), kv_lengths=_jlens(kl),
        kv_seq_len=Sk,
    )
    np.testing.assert_array_equal(ids, np.asarray(two_step))
    assert_close(lse, np_index_lse(qi, ki, ids, q_len, kv_len), rtol=1e-5, atol=1e-5)
    ids_only = indexer(qi, ki, topk=topk, q_lengths=_jlens(ql), kv_lengths=_jlens(kl))
    np.testing.assert_array_equal(np.asarray(ids_only), ids)


# --------------------------------------------------------------------------- #
# sparse_attention / dot_product_attention: forward
# --------------------------------------------------------------------------- #
def _qkv(rng, B, Sq, Sk, hq, hkv, D, dtype=np.float32):
    return normal(rng, (B, Sq, hq, D), dtype), normal(rng, (B, Sk, hkv, D), dtype), normal(rng, (B, Sk, hkv, D), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("heads", HEADS)
def test_sparse_attention(shape, heads):
    Sq, Sk, ql, kl = shape
    hq, hkv = heads
    B, D, topk = 2, 32, 6
    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    q_len, kv_len = _lens(ql, kl, B, Sq, Sk)
    ids = make_sparse_ids(rng, B, Sq, hkv, topk, q_len, kv_len, Sk)
    out, lse = sparse_attention(q, k, v, ids, q_lengths=_jlens(ql), kv_lengths=_jlens(kl), return_lse=True)
    assert out.dtype == jnp.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    exp_out, exp_lse = np_attention(q, k, v, np_sparse_keys(ids, q_len, kv_len))
    assert np.isneginf(exp_lse).any() and np.isfinite(exp_lse).any()  # empty and non-empty rows
    assert_close(out, exp_out, rtol=1e-4, atol=2e-5)
    assert_close(lse, exp_lse, rtol=1e-5, atol=1e-5)
    if heads == (4, 1):  # the return_lse=False path gives the same out
        out_only = sparse_attention(q, k, v, ids, q_lengths=_jlens(ql), kv_lengths=_jlens(kl))
        np.testing.assert_array_equal(np.asarray(out_only), np.asarray(out))


def test_sparse_attention_shuffle_invariant_and_scale():
    rng = np.random.default_rng(11)
    B, Sq, Sk, hq, hkv, D, topk = 2, 200, 457, 4, 2, 32, 5
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    q_len, kv_len = np.array([200, 150]), np.array([457, 300])
    ids = make_sparse_ids(rng, B, Sq, hkv, topk, q_len, kv_len, Sk)
    perm = rng.permuted(ids, axis=-1)
    kw = dict(q_lengths=jnp.asarray(q_len, jnp.int32), kv_lengths=jnp.asarray(kv_len, jnp.int32), scale=0.21)
    a = sparse_attention(q, k, v, ids, **kw)
    b = sparse_attention(q, k, v, perm, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    exp, _ = np_attention(q, k, v, np_sparse_keys(ids, q_len, kv_len), scale=0.21)
    assert_close(a, exp, rtol=1e-4, atol=2e-5)


def test_sparse_equals_dense_when_all_blocks_selected():
    rng = np.random.default_rng(12)
    B, Sq, Sk, hq, hkv, D = 2, 200, 457, 4, 1, 32
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    kw = dict(q_lengths=jnp.array([200, 60], jnp.int32), kv_lengths=jnp.array([457, 300], jnp.int32), return_lse=True)
    ids = np.broadcast_to(np.array([3, 0, 2, 1], np.int32), (B, Sq, hkv, 4))
    o1, l1 = sparse_attention(q, k, v, ids, **kw)
    o2, l2 = dot_product_attention(q, k, v, **kw)
    assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    assert_close(l1, l2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("heads", [(4, 1), (16, 4)])
def test_dot_product_attention(causal, shape, heads):
    Sq, Sk, ql, kl = shape
    hq, hkv = heads
    B, D = 2, 32
    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    q_len, kv_len = _lens(ql, kl, B, Sq, Sk)
    out, lse = dot_product_attention(
        q, k, v, causal=causal, q_lengths=_jlens(ql), kv_lengths=_jlens(kl), return_lse=True
    )
    assert out.dtype == jnp.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    exp_out, exp_lse = np_attention(q, k, v, np_dense_keys(q_len, kv_len, causal))
    assert_close(out, exp_out, rtol=1e-4, atol=2e-5)
    assert_close(lse, exp_lse, rtol=1e-5, atol=1e-5)


def test_dense_causal_is_ordinary_causal_when_square():
    # Against jax.nn.dot_product_attention. Its matmuls run at the backend's
    # default precision (TF32/bf16 passes on GPU), hence the looser bounds;
    # an alignment or masking error would be off by O(0.1).
    rng = np.random.default_rng(14)
    q, k, v = _qkv(rng, 2, 150, 150, 4, 2, 16)
    for causal in (True, False):
        got = dot_product_attention(q, k, v, causal=causal)
        exp = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=5e-3, atol=5e-3)


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
def _loss(fn, dout, dlse):
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        lse_term = jnp.where(jnp.isfinite(lse), lse * dlse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse_term)

    return loss


GRAD_CASES = [
    # Sq, Sk, q_lengths, kv_lengths, hq, hkv
    (300, 300, [300, 257], [300, 280], 4, 1),
    (200, 457, [200, 131], [457, 390], 4, 2),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_sparse_attention_grad(case):
    Sq, Sk, ql, kl, hq, hkv = case
    B, D, topk = 2, 32, 5
    rng = np.random.default_rng(15)
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    q_len, kv_len = _lens(ql, kl, B, Sq, Sk)
    ids = make_sparse_ids(rng, B, Sq, hkv, topk, q_len, kv_len, Sk)
    dout, dlse = normal(rng, q.shape), normal(rng, q.shape[:3])
    fn = lambda q, k, v: sparse_attention(q, k, v, ids, q_lengths=_jlens(ql), kv_lengths=_jlens(kl), return_lse=True)
    grads = jax.jit(jax.grad(_loss(fn, dout, dlse), argnums=(0, 1, 2)))(q, k, v)
    _, exp_lse, *exp = np_attention(q, k, v, np_sparse_keys(ids, q_len, kv_len), dout=dout, dlse=dlse)
    assert np.isneginf(exp_lse).any()  # empty rows are part of the test
    for g, e in zip(grads, exp):
        assert np.all(np.isfinite(np.asarray(g)))
        assert rel_err(g, e) < 1e-5
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_dot_product_attention_grad(causal, case):
    Sq, Sk, ql, kl, hq, hkv = case
    B, D = 2, 32
    rng = np.random.default_rng(16)
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    q_len, kv_len = _lens(ql, kl, B, Sq, Sk)
    dout, dlse = normal(rng, q.shape), normal(rng, q.shape[:3])
    fn = lambda q, k, v: dot_product_attention(
        q, k, v, causal=causal, q_lengths=_jlens(ql), kv_lengths=_jlens(kl), return_lse=True
    )
    grads = jax.jit(jax.grad(_loss(fn, dout, dlse), argnums=(0, 1, 2)))(q, k, v)
    *_, dq, dk, dv = np_attention(q, k, v, np_dense_keys(q_len, kv_len, causal), dout=dout, dlse=dlse)
    for g, e in zip(grads, (dq, dk, dv)):
        assert np.all(np.isfinite(np.asarray(g)))
        assert rel_err(g, e) < 1e-5
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-3, atol=1e-4)


def test_grad_matches_finite_differences():
    """Directional finite difference (float64, on the NumPy oracle's forward)
    against jax.grad of the float32 reference, for both attention ops."""
    rng = np.random.default_rng(17)
    B, Sq, Sk, hq, hkv, D = 1, 140, 300, 2, 1, 16
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    q_len, kv_len = np.array([100]), np.array([270])
    ids = make_sparse_ids(rng, B, Sq, hkv, 3, q_len, kv_len, Sk)
    dout = normal(rng, q.shape)
    lens = dict(q_lengths=jnp.asarray(q_len, jnp.int32), kv_lengths=jnp.asarray(kv_len, jnp.int32))
    for fn, keys in [
        (lambda q, k, v: sparse_attention(q, k, v, ids, **lens), np_sparse_keys(ids, q_len, kv_len)),
        (lambda q, k, v: dot_product_attention(q, k, v, **lens), np_dense_keys(q_len, kv_len, True)),
    ]:
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * dout), argnums=(0, 1, 2)))(q, k, v)
        dirs = [normal(rng, x.shape).astype(np.float64) for x in (q, k, v)]
        eps = 1e-5

        def f(t):
            args = [np.asarray(x, np.float64) + t * d for x, d in zip((q, k, v), dirs)]
            return np.sum(np_attention(*args, keys)[0] * dout)

        fd = (f(eps) - f(-eps)) / (2 * eps)
        an = sum(np.sum(np.asarray(g, np.float64) * d) for g, d in zip(grads, dirs))
        assert abs(fd - an) <= 1e-4 * max(1.0, abs(fd)), (fd, an)


# --------------------------------------------------------------------------- #
# Low precision inputs (spec 4 bounds)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    rng = np.random.default_rng(18)
    B, Sq, Sk, hq, hkv, D, topk = 2, 300, 457, 4, 1, 32, 4
    q_len, kv_len = np.array([300, 211]), np.array([457, 400])
    q, k, v = (jnp.asarray(x).astype(dtype) for x in _qkv(rng, B, Sq, Sk, hq, hkv, D))
    q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    ids = make_sparse_ids(rng, B, Sq, hkv, topk, q_len, kv_len, Sk)
    dout = normal(rng, q.shape)
    lens = dict(q_lengths=jnp.asarray(q_len, jnp.int32), kv_lengths=jnp.asarray(kv_len, jnp.int32))
    cases = [
        (lambda q, k, v: sparse_attention(q, k, v, ids, return_lse=True, **lens), np_sparse_keys(ids, q_len, kv_len)),
        (lambda q, k, v: dot_product_attention(q, k, v, return_lse=True, **lens), np_dense_keys(q_len, kv_len, True)),
    ]
    for fn, keys in cases:
        out, lse = fn(q, k, v)
        assert out.dtype == dtype and lse.dtype == jnp.float32
        exp_out, exp_lse, *exp_grads = np_attention(q64, k64, v64, keys, dout=dout)
        assert rel_err(out, exp_out) <= 2e-2
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(exp_lse))
        fin = np.isfinite(exp_lse)
        assert np.max(np.abs(np.asarray(lse)[fin] - exp_lse[fin])) <= 2e-3
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32) * dout), argnums=(0, 1, 2)))(q, k, v)
        for g, e in zip(grads, exp_grads):
            assert g.dtype == dtype
            assert rel_err(g, e) <= 3e-2


# --------------------------------------------------------------------------- #
# msa_attention
# --------------------------------------------------------------------------- #
def test_msa_attention():
    rng = np.random.default_rng(19)
    B, Sq, Sk, hq, hkv, D, Di, topk = 2, 200, 700, 4, 2, 32, 16, 3
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    qi, ki = normal(rng, (B, Sq, hkv, Di)), normal(rng, (B, Sk, Di))
    q_len, kv_len = np.array([200, 120]), np.array([700, 500])
    lens = dict(q_lengths=jnp.asarray(q_len, jnp.int32), kv_lengths=jnp.asarray(kv_len, jnp.int32))
    out, ids = msa_attention(q, k, v, qi, ki, topk=topk, return_ids=True, **lens)
    exp_ids = indexer(qi, ki, topk=topk, **lens)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(exp_ids))
    exp_out, _ = np_attention(q, k, v, np_sparse_keys(np.asarray(ids), q_len, kv_len))
    assert_close(out, exp_out, rtol=1e-4, atol=2e-5)
    # Gradient flows to q, k, v and not to the index tensors.
    gq, gqi, gki = jax.jit(jax.grad(
        lambda q, qi, ki: jnp.sum(msa_attention(q, k, v, qi, ki, topk=topk, **lens) ** 2), argnums=(0, 1, 2)
    ))(q, qi, ki)
    assert np.abs(np.asarray(gq)).max() > 0
    assert np.all(np.asarray(gqi) == 0) and np.all(np.asarray(gki) == 0)
    with pytest.raises(ValueError):
        msa_attention(q, k, v, normal(rng, (B, Sq, 1, Di)), ki, topk=topk)


# --------------------------------------------------------------------------- #
# Chunking, jit, vmap
# --------------------------------------------------------------------------- #
def _all_ops(q, k, v, qi, ki, ids, lens, topk, grad=True):
    out = {}
    out["scores"] = R.block_scores(qi, ki, **lens)
    out["select"] = R.topk_select(out["scores"], topk=topk, kv_seq_len=k.shape[1], **lens)
    out["ids"], out["ilse"] = R.indexer(qi, ki, topk=topk, return_lse=True, **lens)
    out["sparse"], out["slse"] = R.sparse_attention(q, k, v, ids, return_lse=True, **lens)
    out["dense"], out["dlse"] = R.dot_product_attention(q, k, v, return_lse=True, **lens)
    out["nc"] = R.dot_product_attention(q, k, v, causal=False, **lens)
    if grad:
        out["grad"] = jax.grad(lambda q, k, v: jnp.sum(R.sparse_attention(q, k, v, ids, **lens) ** 2), argnums=(0, 1, 2))(q, k, v)
    return out


def _inputs(seed, B=2, Sq=300, Sk=457, hq=4, hkv=2, D=16, Di=16, topk=3):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B, Sq, Sk, hq, hkv, D)
    qi, ki = normal(rng, (B, Sq, hkv, Di)), normal(rng, (B, Sk, Di))
    q_len, kv_len = np.array([Sq, Sq - 110][:B]), np.array([Sk, Sk - 100][:B])
    ids = make_sparse_ids(rng, B, Sq, hkv, topk, q_len, kv_len, Sk)
    lens = dict(q_lengths=jnp.asarray(q_len, jnp.int32), kv_lengths=jnp.asarray(kv_len, jnp.int32))
    return q, k, v, qi, ki, ids, lens, topk


def _assert_tree_close(a, b, exact_ints=True):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if np.issubdtype(x.dtype, np.integer) and exact_ints:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_array_equal(np.isneginf(x), np.isneginf(y))
            fin = np.isfinite(y)
            np.testing.assert_allclose(x[fin], y[fin], rtol=2e-5, atol=2e-6)


def _jit_all_ops(topk):
    # A fresh jit each time: QUERY_CHUNK is read at trace time.
    return jax.jit(lambda q, k, v, qi, ki, ids, lens: _all_ops(q, k, v, qi, ki, ids, lens, topk))


def test_chunking_matches_single_chunk(monkeypatch):
    *args, topk = _inputs(20)
    monkeypatch.setattr(R, "QUERY_CHUNK", 4096)
    single = _jit_all_ops(topk)(*args)
    monkeypatch.setattr(R, "QUERY_CHUNK", 64)  # 5 chunks, the last one padded
    chunked = _jit_all_ops(topk)(*args)
    _assert_tree_close(chunked, single)
    # And the default chunk (300 queries > 256: two chunks) agrees as well.
    monkeypatch.undo()
    assert R.QUERY_CHUNK < 300
    _assert_tree_close(_jit_all_ops(topk)(*args), single)


def test_jit():
    # Eager (op by op) against jit; 300 queries take two chunks. The eager
    # backward pass is left out (slow on CPU); it is the same code as the
    # jitted gradients checked everywhere else.
    *args, topk = _inputs(21, Sk=300, hq=2, hkv=1)
    eager = _all_ops(*args, topk, grad=False)
    jitted = jax.jit(lambda *a: _all_ops(*a, topk, grad=False))(*args)
    _assert_tree_close(jitted, eager)


def test_vmap():
    # Leading extra axis of 2 over the batched functions (each slice: B=2,
    # 300 queries: two chunks).
    slices = [_inputs(22 + n) for n in range(2)]
    topk = slices[0][-1]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[s[:-1] for s in slices])
    fn = lambda q, k, v, qi, ki, ids, lens: _all_ops(q, k, v, qi, ki, ids, lens, topk)
    batched = jax.jit(jax.vmap(fn))(*stacked)
    single = jax.jit(fn)
    for n, s in enumerate(slices):
        _assert_tree_close(jax.tree_util.tree_map(lambda x: x[n], batched), single(*s[:-1]))
