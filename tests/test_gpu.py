"""On a GPU (skipped elsewhere): every op runs there, kernel or fallback, and
agrees with the CPU kernels on the same inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_msa
from jax_msa import reference
from helpers import assert_lse_close, assert_same_selection, normal, rel_err

try:
    GPU = jax.devices("gpu")[0]
except RuntimeError:
    GPU = None

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="needs a GPU")]
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
