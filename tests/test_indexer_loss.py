"""indexer_kl_loss: kernel, reference and gradients against a NumPy oracle of spec §3.8."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_msa
from jax_msa import _ffi, reference
from helpers import BLOCK, adversarial_ids, normal, random_lengths, rel_err


def np_kl_loss(q, k, qi, ki, ids, q_len, kv_len, coeff=1.0):
    """Loss, dqi, dki in float64 with loops, straight from the spec."""
    q, k, qi, ki = (np.asarray(x, np.float64) for x in (q, k, qi, ki))
    ids, q_len, kv_len = np.asarray(ids), np.asarray(q_len), np.asarray(kv_len)
    b_size, sq, hq, d = q.shape
    hkv, di = k.shape[2], qi.shape[3]
    g_size = hq // hkv
    norm = coeff / (hkv * max(q_len.sum(), 1))
    loss, dqi, dki = 0.0, np.zeros_like(qi), np.zeros_like(ki)
    for b in range(b_size):
        for i in range(q_len[b]):
            p = kv_len[b] - q_len[b] + i
            for g in range(hkv):
                blocks = sorted({int(c) for c in ids[b, i, g] if 0 <= c <= p // BLOCK})
                keys = [j for c in blocks for j in range(c * BLOCK, min((c + 1) * BLOCK, kv_len[b], p + 1))]
                if not keys:
                    continue
                logits = d**-0.5 * q[b, i, g * g_size:(g + 1) * g_size] @ k[b, keys, g].T
                teacher = np.exp(logits - logits.max(-1, keepdims=True))
                p_t = (teacher / teacher.sum(-1, keepdims=True)).mean(0)
                z = di**-0.5 * ki[b, keys] @ qi[b, i, g]
                log_ps = z - z.max() - np.log(np.exp(z - z.max()).sum())
                loss += np.sum(p_t * (np.log(p_t) - log_ps))
                dz = norm * (np.exp(log_ps) - p_t)
                dqi[b, i, g] += di**-0.5 * dz @ ki[b, keys]
                dki[b, keys] += di**-0.5 * np.outer(dz, qi[b, i, g])
    return norm * loss, dqi, dki


def _inputs(seed, shape, dtype=jnp.float32, index_dtype=jnp.float32):
    b, sq, sk, hq, hkv, d, di, topk = shape
    rng = np.random.default_rng(seed)
    ql, kl = random_lengths(rng, b, sq, sk)
    q, k = normal(rng, (b, sq, hq, d), dtype), normal(rng, (b, sk, hkv, d), dtype)
    qi, ki = normal(rng, (b, sq, hkv, di), index_dtype), normal(rng, (b, sk, di), index_dtype)
    ids = jax.jit(functools.partial(reference.indexer, topk=topk))(qi, ki, q_lengths=ql, kv_lengths=kl)
    return (q, k, qi, ki, adversarial_ids(rng, ids, kl)), dict(q_lengths=ql, kv_lengths=kl)


def _loss_and_grads(implementation, args, lengths, coeff=1.0):
    q, k, qi, ki, ids = args
    loss = lambda qi, ki: jax_msa.indexer_kl_loss(q, k, qi, ki, ids, coeff=coeff, implementation=implementation,
                                                  **lengths)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(qi, ki)


# (B, Sq, Sk, Hq, Hkv, D, Di, topk): chunked (Sq < Sk), GQA 2/4, unaligned lengths.
SHAPES = [
    (2, 150, 300, 4, 2, 32, 16, 2),
    (1, 77, 457, 4, 1, 64, 32, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("implementation", ["kernel", "reference"])
def test_matches_numpy_oracle(shape, implementation):
    args, lengths = _inputs(0, shape)
    loss, (dqi, dki) = _loss_and_grads(implementation, args, lengths, coeff=0.3)
    want, want_dqi, want_dki = np_kl_loss(*args, lengths["q_lengths"], lengths["kv_lengths"], coeff=0.3)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert rel_err(dqi, want_dqi) <= 1e-4 and rel_err(dki, want_dki) <= 1e-4, (rel_err(dqi, want_dqi),
                                                                               rel_err(dki, want_dki))


@pytest.mark.parametrize("dtypes", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
def test_kernel_matches_reference_low_precision(dtypes):
    args, lengths = _inputs(1, (2, 300, 300, 8, 2, 32, 64, 2), *dtypes)
    loss, grads = _loss_and_grads("kernel", args, lengths)
    want, want_grads = _loss_and_grads("reference", args, lengths)
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtypes[1] and rel_err(g, w) <= (1e-2 if dtypes[1] == jnp.bfloat16 else 1e-4)


def test_only_the_indexer_gets_gradients():
    (q, k, qi, ki, ids), lengths = _inputs(2, SHAPES[0])
    grads = jax.grad(lambda *a: jax_msa.indexer_kl_loss(*a, ids, **lengths), argnums=(0, 1, 2, 3))(q, k, qi, ki)
    assert not np.any(grads[0]) and not np.any(grads[1])
    assert np.any(grads[2]) and np.any(grads[3])


def test_gradient_check_and_finite_difference():
    (q, k, qi, ki, ids), lengths = _inputs(3, (1, 40, 200, 2, 1, 16, 16, 2))
    loss = lambda qi, ki: jax_msa.indexer_kl_loss(q, k, qi, ki, ids, implementation="kernel", **lengths)
    check_grads(loss, (qi, ki), order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2)
    # Central difference along a random direction against <grad, direction>.
    rng = np.random.default_rng(4)
    u_qi, u_ki = normal(rng, qi.shape), normal(rng, ki.shape)
    eps = 1e-2
    numeric = (loss(qi + eps * u_qi, ki + eps * u_ki) - loss(qi - eps * u_qi, ki - eps * u_ki)) / (2 * eps)
    g_qi, g_ki = jax.grad(loss, argnums=(0, 1))(qi, ki)
    np.testing.assert_allclose(jnp.vdot(g_qi, u_qi) + jnp.vdot(g_ki, u_ki), numeric, rtol=1e-2)


def test_empty_selection_contributes_nothing():
    (q, k, qi, ki, ids), lengths = _inputs(5, SHAPES[0])
    none = jnp.full_like(ids, -1)
    loss, (dqi, dki) = _loss_and_grads("kernel", (q, k, qi, ki, none), lengths)
    assert float(loss) == 0.0 and not np.any(dqi) and not np.any(dki)


def test_vmap_matches_loop():
    (q, k, qi, ki, ids), lengths = _inputs(6, SHAPES[0])
    stack = lambda x: jnp.stack([x, x[::-1]])
    fn = lambda q, k, qi, ki, ids: jax_msa.indexer_kl_loss(q, k, qi, ki, ids, **lengths)
    got = jax.jit(jax.vmap(jax.value_and_grad(fn, argnums=2)))(*(stack(x) for x in (q, k, qi, ki, ids)))
    for i in range(2):
        loss, grad = jax.value_and_grad(fn, argnums=2)(*(stack(x)[i] for x in (q, k, qi, ki, ids)))
        np.testing.assert_allclose(got[0][i], loss, rtol=1e-6)
        np.testing.assert_allclose(got[1][i], grad, rtol=1e-5, atol=1e-8)


_ARGS, _LENGTHS = _inputs(7, SHAPES[0])


def test_lowering_contains_custom_call():
    q, k, qi, ki, ids = _ARGS
    grad = lambda: jax.grad(lambda qi: jax_msa.indexer_kl_loss(q, k, qi, ki, ids))(qi)
    for fn in (lambda: jax_msa.indexer_kl_loss(*_ARGS), grad):
        assert "@jax_msa_indexer_kl_loss(" in jax.jit(fn).lower().as_text()


@pytest.mark.skipif(_ffi.has_kernel("jax_msa_indexer_kl_loss", "cuda"),
                    reason="checks the fallback of an op without a CUDA kernel")
def test_cuda_lowering_falls_back_to_reference():
    q, k, qi, ki, ids = _ARGS
    fn = lambda: jax.grad(lambda qi: jax_msa.indexer_kl_loss(q, k, qi, ki, ids))(qi)
    assert "jax_msa_indexer_kl_loss" not in jax.jit(fn).trace().lower(lowering_platforms=("cuda",)).as_text()


def _call(**changes):
    a = {**dict(zip(("q", "k", "qi", "ki", "ids"), _ARGS)), **changes}
    return lambda: jax_msa.indexer_kl_loss(a["q"], a["k"], a["qi"], a["ki"], a["ids"], **a.get("kw", {}))


@pytest.mark.parametrize("call, error, match", [
    (_call(q=_ARGS[0][0]), ValueError, r"q must have rank 4"),
    (_call(k=_ARGS[1][:, :, :, :8]), ValueError, r"k has shape"),
    (_call(qi=_ARGS[2][:, :, :1]), ValueError, r"qi has 1 index heads but k has 2"),
    (_call(ki=_ARGS[3][:, :100]), ValueError, r"ki has shape"),
    (_call(ki=_ARGS[3].astype(jnp.bfloat16)), TypeError, r"ki has dtype bfloat16 but qi"),
    (_call(q=_ARGS[0][:, :, :3]), ValueError, r"not a multiple"),
    (_call(ids=_ARGS[4][..., :0]), ValueError, r"topk"),
    (_call(ids=_ARGS[4].astype(jnp.float32)), TypeError, r"ids must be an integer"),
    (_call(kw=dict(q_lengths=jnp.asarray([151, 3]))), ValueError, r"q_lengths must lie in \[0, 150\]"),
    (_call(kw=dict(kv_lengths=jnp.asarray([300, 100]))), ValueError, r"kv_lengths must be >= q_lengths"),
    (_call(kw=dict(implementation="fast")), ValueError, r"implementation"),
])
def test_bad_input_raises_at_trace_time(call, error, match):
    with pytest.raises(error, match=match):
        jax.jit(call).lower()
