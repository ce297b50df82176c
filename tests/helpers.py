"""Shared test helpers: random inputs and comparisons against the reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

BLOCK = 128

# Spec §4 bounds, by input dtype: (relative error of out/grads, absolute error of lse).
TOLERANCES = {
    jnp.float32: (2e-5, 1e-5),
    jnp.bfloat16: (2e-2, 2e-3),
    jnp.float16: (5e-3, 2e-3),
}


def normal(rng: np.random.Generator, shape, dtype=jnp.float32) -> jnp.ndarray:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def rel_err(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_lse_close(lse, ref, atol):
    lse, ref = np.asarray(lse), np.asarray(ref)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(lse[finite], ref[finite], atol=atol, rtol=0)


def assert_same_selection(ids, ref):
    """Same set of blocks per row, the local block last, -1 padding at the end."""
    ids, ref = np.asarray(ids), np.asarray(ref)
    assert ids.shape == ref.shape and ids.dtype == np.int32
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(ref, -1))
    count = (ref >= 0).sum(-1)
    slots = np.arange(ref.shape[-1])
    np.testing.assert_array_equal(ids >= 0, slots < count[..., None])
    last = np.maximum(count - 1, 0)[..., None]
    np.testing.assert_array_equal(np.take_along_axis(ids, last, -1), np.take_along_axis(ref, last, -1))


def random_lengths(rng, batch, q_len, kv_len):
    """Per-row lengths with kv >= q, the first row full, others shorter."""
    q = [q_len] + [int(rng.integers(1, q_len + 1)) for _ in range(batch - 1)]
    kv = [kv_len] + [int(rng.integers(qi, kv_len + 1)) for qi in q[1:]]
    return jnp.asarray(q, jnp.int32), jnp.asarray(kv, jnp.int32)


def adversarial_ids(rng, ids, kv_lengths):
    """Valid selections made hostile: -1, out-of-range ids, future blocks, shuffled order."""
    ids = np.array(ids)
    num_blocks = -(-np.asarray(kv_lengths) // BLOCK)
    shape = ids.shape
    flat = ids.reshape(shape[0], -1, shape[-1])
    for b in range(shape[0]):
        for row in flat[b]:
            rng.shuffle(row)
            valid = np.flatnonzero(row >= 0)
            pick = rng.random()
            if pick < 0.15 and len(valid) > 1:
                row[rng.choice(valid)] = -1
            elif pick < 0.3 and -1 in row:
                row[np.flatnonzero(row < 0)[0]] = rng.choice([num_blocks[b], num_blocks[b] + 7, 2**30, -5])
            elif pick < 0.45 and -1 in row:
                future = int(rng.integers(0, num_blocks[b]))
                if future not in row:
                    row[np.flatnonzero(row < 0)[0]] = future
    return jnp.asarray(flat.reshape(shape), jnp.int32)
