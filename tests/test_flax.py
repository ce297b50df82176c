"""The Flax MSA attention block: shapes, where gradients go, the dense
fallback, a few training steps, and the example's command line.
(Its context-parallel form runs in test_sharding, on 8 devices.)"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

from jax_msa.flax import MSAAttention, rope  # noqa: E402

from helpers import rel_err  # noqa: E402

B, S, E = 2, 384, 32


def _block(**kwargs) -> MSAAttention:
    config = dict(num_heads=4, num_kv_heads=2, head_dim=16, index_head_dim=16, topk=2)
    return MSAAttention(E, **{**config, **kwargs}, rngs=nnx.Rngs(0))


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, S, E))


def test_rope_rotates_pairs_by_position():
    x = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
    positions = jnp.arange(5)[None]
    y = rope(x, positions)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)  # position 0: identity
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # Relative: <rope(a, i), rope(b, j)> depends on i - j only.
    a, b = x[:, :1, :1], x[:, 1:2, :1]
    dot = lambda i, j: jnp.sum(rope(a, jnp.array([[i]])) * rope(b, jnp.array([[j]])))
    np.testing.assert_allclose(dot(3, 1), dot(7, 5), rtol=1e-5)


def test_block_runs_with_lengths():
    block = _block()
    y, loss = jax.jit(lambda x, n: block(x, lengths=n))(_x(), jnp.asarray([S, 200]))
    assert y.shape == (B, S, E) and loss.shape == ()
    assert np.isfinite(loss) and loss > 0
    assert np.all(np.isfinite(y))


def test_indexer_trains_on_its_own_loss_only():
    graphdef, params = nnx.split(_block())
    x, target = _x(), _x(1)

    def grads(which):
        def loss(params):
            y, indexer_loss = nnx.merge(graphdef, params)(x)
            return jnp.mean((y - target) ** 2) if which == "output" else indexer_loss
        return jax.grad(loss)(params)

    norm = lambda g, name: float(jnp.linalg.norm(g[name]["kernel"][...]))
    from_output, from_indexer = grads("output"), grads("indexer")
    for name in ("index_q_proj", "index_k_proj"):
        assert norm(from_output, name) == 0 and norm(from_indexer, name) > 0
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert norm(from_output, name) > 0 and norm(from_indexer, name) == 0


def test_msa_with_every_block_selected_equals_dense():
    # topk >= the number of blocks: MSA attends to all the past, like dense attention.
    block = _block(topk=3)
    y_msa, loss_msa = block(_x())
    block.attention = "dense"
    y_dense, loss_dense = block(_x())
    assert rel_err(y_msa, y_dense) <= 1e-5
    np.testing.assert_allclose(loss_msa, loss_dense, rtol=1e-5)  # same ids, same KL


def test_dense_fallback_differs_when_sparse():
    block = _block(topk=1)
    y_msa, _ = block(_x())
    block.attention = "dense"
    y_dense, _ = block(_x())
    assert rel_err(y_msa, y_dense) > 1e-2


def test_bad_attention_kind():
    with pytest.raises(ValueError, match="attention must be one of"):
        _block(attention="flash")


@pytest.mark.parametrize("attention", ["msa", "dense"])
def test_loss_decreases(attention):
    block = _block(attention=attention)
    graphdef, params = nnx.split(block)
    x, target = _x(), _x(1)
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    def loss_fn(params):
        y, indexer_loss = nnx.merge(graphdef, params)(x)
        fit = jnp.mean((y - target) ** 2)
        return fit + indexer_loss, (fit, indexer_loss)

    @jax.jit
    def step(params, state):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, metrics

    history = []
    for _ in range(8):
        params, state, metrics = step(params, state)
        history.append([float(m) for m in metrics])
    (fit0, kl0), (fit1, kl1) = history[0], history[-1]
    assert fit1 < fit0 and kl1 < 0.8 * kl0, history


def test_example_runs():
    """examples/train_flax.py at toy size: both phases, on a 2 x 2 mesh of emulated CPUs."""
    script = pathlib.Path(__file__).parents[1] / "examples" / "train_flax.py"
    # The CPU backend even where GPUs exist: the emulated 2 x 2 mesh is what is tested.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    args = ["--steps", "3", "--dense-fraction", "0.4", "--log-every", "1", "--seq-len", "256", "--batch", "4",
            "--layers", "1", "--embed", "32", "--facts", "4", "--queries", "4"]
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(data=2, context=2)" in proc.stdout
    assert "dense attention warm-up" in proc.stdout and "MSA (sparse) attention" in proc.stdout
    assert "tokens/s" in proc.stdout
