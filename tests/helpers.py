"""Shared test helpers: random inputs and comparisons against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BLOCK = 128
E4M3 = jnp.float8_e4m3fn

# Spec §4 bounds, by input dtype: (relative error of out/grads, absolute error of lse).
TOLERANCES = {
    jnp.float32: (2e-5, 1e-5),
    jnp.bfloat16: (2e-2, 2e-3),
    jnp.float16: (5e-3, 2e-3),
}


def first_gpu():
    """The first GPU device, or None on a machine without one."""
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


# pytestmark of the GPU suites: marked `gpu`, skipped without a GPU.
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(first_gpu() is None, reason="needs a GPU")]


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


# Paged caches (spec §3.7).
HOSTILE_ENTRIES = [-1, -(2**31), 2**30, 2**31 - 1]


def make_page_table(rng, kv_lengths, num_pages, max_pages, holes=0.0):
    """Each request's used logical pages on distinct random physical pages
    (a shuffled pool); the other entries are hostile (-1, >= num_pages). With
    `holes`, that fraction of the used entries become hostile too."""
    kv_lengths = np.asarray(kv_lengths)
    used = -(-kv_lengths // BLOCK)
    pool = iter(rng.permutation(num_pages))
    table = rng.choice(HOSTILE_ENTRIES + [num_pages], size=(len(kv_lengths), max_pages)).astype(np.int32)
    for b, n in enumerate(used):
        for c in range(n):
            table[b, c] = next(pool)
            if rng.random() < holes:
                table[b, c] = rng.choice(HOSTILE_ENTRIES + [num_pages])
    return table


def to_pages(x, table, kv_lengths, num_pages):
    """Lays x [B, S, ...] (S = max_pages * 128) out in pages [num_pages, 128, ...]
    following `table`. Unused pages and keys past kv_length hold NaN: a kernel
    that reads them gives NaN."""
    x = np.asarray(x, np.float32)
    pages = np.full((num_pages, BLOCK, *x.shape[2:]), np.nan, np.float32)
    for b, row in enumerate(table):
        for c, page in enumerate(row):
            if 0 <= page < num_pages and c * BLOCK < kv_lengths[b]:
                block = x[b, c * BLOCK:(c + 1) * BLOCK].copy()
                block[kv_lengths[b] - c * BLOCK:] = np.nan
                pages[page] = block
    return pages


def quantise(pages, dtype):
    """Pages in `dtype` and their scale; e4m3 pages are scaled to its range."""
    if dtype != E4M3:
        return jnp.asarray(pages, dtype), 1.0
    scale = float(np.nanmax(np.abs(pages))) / 448.0
    return jnp.asarray(pages / scale, E4M3), scale
