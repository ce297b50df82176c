"""The SM90 block-sparse attention kernels (skipped without a GPU): forward
(and, where the build has it, backward) against the float32 reference on the
GPU, on random inputs with unaligned lengths, GQA groups and hostile ids."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_msa
from jax_msa import reference
from jax_msa._primitives import NoKernelError
from helpers import adversarial_ids, assert_lse_close, BLOCK, first_gpu, GPU_ONLY, normal, rel_err, TOLERANCES

GPU = first_gpu()
pytestmark = GPU_ONLY

# (B, Sq, Sk, Hq, Hkv, topk): GQA 16 (MSA), 4, 3 (a group that does not divide
# 64), 1 and 64; chunked prefill (Sq < Sk); topk 1..64.
SHAPES = [
    (2, 1000, 1000, 16, 1, 16),
    (1, 700, 1500, 32, 2, 5),
    (1, 1100, 1100, 16, 4, 8),
    (1, 600, 600, 12, 4, 3),
    (1, 513, 513, 2, 2, 64),
    (1, 300, 400, 64, 1, 1),
]


def _window_ids(b, sq, hkv, topk, q_lengths, kv_lengths):
    """Local block and the blocks before it (MSA's own attention tests)."""
    ids = np.full((b, sq, hkv, topk), -1, np.int32)
    for row in range(b):
        pos = int(kv_lengths[row]) - int(q_lengths[row]) + np.arange(int(q_lengths[row]))
        local = pos // BLOCK
        start = np.maximum(local - topk + 1, 0)
        for slot in range(topk):
            c = start + slot
            ids[row, : len(pos), :, slot] = np.where(c <= local, c, -1)[:, None]
    return jnp.asarray(ids)


def _spread_ids(b, sq, hkv, topk, q_lengths, kv_lengths):
    """Blocks that neighbouring tokens do not share: token t takes blocks
    (t * topk + k) mod (local block + 1), distinct, then -1."""
    ids = np.full((b, sq, hkv, topk), -1, np.int32)
    slot = np.arange(topk)[None, :]
    for row in range(b):
        t = np.arange(int(q_lengths[row]))[:, None]
        local = (int(kv_lengths[row]) - int(q_lengths[row]) + t) // BLOCK
        ids[row, : len(t), :, :] = np.where(slot <= local, (t * topk + slot) % (local + 1), -1)[:, None, :]
    return jnp.asarray(ids)


def _inputs(seed, shape, dtype, pattern):
    b, sq, sk, hq, hkv, topk = shape
    rng = np.random.default_rng(seed)
    ql = np.asarray([sq] + [int(rng.integers(1, sq + 1)) for _ in range(b - 1)], np.int32)
    kl = np.asarray([sk] + [int(rng.integers(q, sk + 1)) for q in ql[1:]], np.int32)
    if sq < sk:
        ql[0] = sq - 37  # bottom-right alignment with padding too
    q, k, v = (normal(rng, s, dtype) for s in ((b, sq, hq, 128), (b, sk, hkv, 128), (b, sk, hkv, 128)))
    ql, kl = jnp.asarray(ql), jnp.asarray(kl)
    if pattern == "window":
        ids = _window_ids(b, sq, hkv, topk, np.asarray(ql), np.asarray(kl))
    elif pattern == "spread":
        ids = _spread_ids(b, sq, hkv, topk, np.asarray(ql), np.asarray(kl))
    else:
        qi, ki = normal(rng, (b, sq, hkv, 64)), normal(rng, (b, sk, 64))
        ids = reference.indexer(qi, ki, topk=topk, q_lengths=ql, kv_lengths=kl)
        if pattern == "hostile":
            ids = adversarial_ids(rng, ids, kl)
    return dict(q=q, k=k, v=v, ids=ids, q_lengths=ql, kv_lengths=kl)


CPU = jax.devices("cpu")[0]


def _reference(a, scale=None):
    """The float32 reference, on the CPU (compiles in seconds there)."""
    a = jax.device_put({n: x.astype(jnp.float32) if n in "qkv" else x for n, x in a.items()}, CPU)
    with jax.default_device(CPU):
        return reference.sparse_attention(a["q"], a["k"], a["v"], a["ids"], q_lengths=a["q_lengths"],
                                          kv_lengths=a["kv_lengths"], scale=scale, return_lse=True)


def _kernel_forward(a, scale=None, schedule="auto"):
    return jax.jit(lambda q, k, v, ids, ql, kl: jax_msa.sparse_attention(
        q, k, v, ids, q_lengths=ql, kv_lengths=kl, scale=scale, return_lse=True, implementation="kernel",
        schedule=schedule))(a["q"], a["k"], a["v"], a["ids"], a["q_lengths"], a["kv_lengths"])


CASES = [(shape, "hostile") for shape in SHAPES] + [(SHAPES[0], "window"), (SHAPES[2], "window"),
                                                     (SHAPES[1], "indexer")]


def _assert_matches_reference(a, out, lse):
    """bf16 bounds against the float32 reference; padded rows: zeros and -inf."""
    ref_out, ref_lse = _reference(a)
    rtol, atol = TOLERANCES[jnp.bfloat16]
    assert rel_err(out, ref_out) <= rtol
    assert_lse_close(lse, ref_lse, atol)
    ql = np.asarray(a["q_lengths"])
    for b in range(out.shape[0]):
        assert not np.any(np.asarray(out[b, ql[b]:], np.float32))
        assert np.all(np.isneginf(np.asarray(lse[b, ql[b]:])))


@pytest.mark.parametrize("schedule", ["query", "block", "auto"])
@pytest.mark.parametrize("shape,pattern", CASES)
def test_forward_matches_reference(shape, pattern, schedule):
    a = jax.device_put(_inputs(zlib.crc32(repr((shape, pattern)).encode()), shape, jnp.bfloat16, pattern), GPU)
    out, lse = _kernel_forward(a, schedule=schedule)
    assert out.dtype == jnp.bfloat16
    _assert_matches_reference(a, out, lse)


def test_by_block_forward_over_several_chunks():
    """The by-block forward in chunks (here 3 of <= 384 tokens: B * Hq * D * 2
    bytes of Q per token, 32 MiB per chunk; sparse_fwd_by_block.hpp): the
    index, partial and reverse-map workspaces reused chunk after chunk."""
    a = jax.device_put(_inputs(21, (4, 1100, 1100, 64, 4, 16), jnp.bfloat16, "hostile"), GPU)
    out, lse = _kernel_forward(a, schedule="block")
    _assert_matches_reference(a, out, lse)


@pytest.mark.parametrize("shape,pattern", CASES)
def test_portable_forward_matches_reference(shape, pattern, monkeypatch):
    """The portable family's forward (mma.sync; kernel_family.h), forced with
    JAX_MSA_KERNELS=portable on this card, on the query-outer path."""
    monkeypatch.setenv("JAX_MSA_KERNELS", "portable")
    a = jax.device_put(_inputs(zlib.crc32(repr((shape, pattern, "portable")).encode()), shape, jnp.bfloat16,
                               pattern), GPU)
    out, lse = _kernel_forward(a, schedule="query")
    _assert_matches_reference(a, out, lse)


def test_portable_forward_fp16_negative_scale(monkeypatch):
    monkeypatch.setenv("JAX_MSA_KERNELS", "portable")
    a = jax.device_put(_inputs(15, (1, 900, 900, 16, 1, 16), jnp.float16, "indexer"), GPU)
    out, lse = _kernel_forward(a, scale=-0.05, schedule="query")
    ref_out, ref_lse = _reference(a, scale=-0.05)
    assert rel_err(out, ref_out) <= 1e-2
    assert_lse_close(lse, ref_lse, 2e-3)


@pytest.mark.parametrize("schedule", ["query", "block"])
def test_forward_fp16_negative_scale(schedule):
    a = jax.device_put(_inputs(5, (1, 900, 900, 16, 1, 16), jnp.float16, "indexer"), GPU)
    out, lse = _kernel_forward(a, scale=-0.05, schedule=schedule)
    ref_out, ref_lse = _reference(a, scale=-0.05)
    assert rel_err(out, ref_out) <= 1e-2
    assert_lse_close(lse, ref_lse, 2e-3)


def test_forward_duplicate_and_huge_ids_stay_safe():
    """Duplicates are a caller error (result unspecified) but must not fault;
    ids of 2**31 - 1 and negative ones are skipped."""
    a = _inputs(6, (1, 640, 640, 16, 1, 8), jnp.bfloat16, "indexer")
    ids = np.array(a["ids"])
    ids[:, ::3, :, 1] = ids[:, ::3, :, 0]
    ids[:, 1::5, :, 2] = 2**31 - 1
    ids[:, 2::5, :, 3] = -(2**31)
    a["ids"] = jnp.asarray(ids)
    for schedule in ("query", "block"):
        out, lse = _kernel_forward(jax.device_put(a, GPU), schedule=schedule)
        assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("pattern,topk,query_wins", [("window", 16, True), ("spread", 4, False)])
def test_auto_schedule_picks_one_schedule_from_the_ids(pattern, topk, query_wins):
    """schedule="auto" enqueues both forwards; the cost sums (the ScheduleCosts in
    the last 6 ints of its index workspace: union blocks, attended pairs, walked
    blocks) pick the query-outer one on window ids and the by-block one on ids
    that neighbouring tokens do not share (schedule_gate.hpp), and only that
    one writes the output: bitwise the result of the picked schedule run alone."""
    from jax_msa.sparse_attention import _fwd_auto_p
    a = jax.device_put(_inputs(8, (1, 8192, 8192, 16, 1, topk), jnp.bfloat16, pattern), GPU)
    args = [a[n] for n in ("q", "k", "v", "ids", "q_lengths", "kv_lengths")]
    out, lse, index, _ = jax.jit(lambda *x: _fwd_auto_p.bind(*x, scale=np.float32(128**-0.5),
                                                             implementation="kernel"))(*args)
    union_blocks, attended, walked_blocks = np.asarray(index[-6:]).view(np.uint64)
    # Each of the two consumer warpgroups walks at most the tile's union.
    assert 0 < union_blocks <= walked_blocks <= 2 * union_blocks
    # kQueryOverBlockCost = 28 per walked block against 1 per (row, slot), and
    # kByBlockChunkCost = 90000 for the by-block launches of one chunk (one here).
    assert attended > 0 and (28 * walked_blocks + 90000 < 16 * attended) == query_wins
    picked_out, picked_lse = _kernel_forward(a, schedule="query" if query_wins else "block")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(picked_out, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(picked_lse))


def test_kernel_is_the_custom_call_and_float32_falls_back():
    a = jax.device_put(_inputs(7, (1, 256, 256, 16, 1, 4), jnp.bfloat16, "window"), GPU)
    fn = lambda q, k, v, ids: jax_msa.sparse_attention(q, k, v, ids, implementation="kernel")
    assert "jax_msa_sparse_attention_fwd" in jax.jit(fn).lower(a["q"], a["k"], a["v"], a["ids"]).as_text()
    f32 = {n: a[n].astype(jnp.float32) for n in ("q", "k", "v")}
    auto = jax.jit(lambda q, k, v, ids: jax_msa.sparse_attention(q, k, v, ids))
    assert "jax_msa_sparse_attention_fwd" not in auto.lower(f32["q"], f32["k"], f32["v"], a["ids"]).as_text()
    with pytest.raises(NoKernelError):
        jax.jit(fn).lower(f32["q"], f32["k"], f32["v"], a["ids"])


def _loss(attention, a, weights, scale=None):
    """sum(out * w_out) + sum(lse * w_lse): exercises both cotangents."""
    def fn(q, k, v):
        out, lse = attention(q, k, v, scale)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * weights[0]) + jnp.sum(lse * weights[1])
    return fn


_BWD_CASES = [
    (SHAPES[0], "hostile", jnp.bfloat16, None), (SHAPES[1], "hostile", jnp.bfloat16, None),
    (SHAPES[3], "hostile", jnp.bfloat16, None), (SHAPES[4], "indexer", jnp.bfloat16, None),
    (SHAPES[0], "window", jnp.bfloat16, None), (SHAPES[2], "empty rows", jnp.float16, -0.06),
    ((1, 400, 450, 4, 4, 64), "hostile", jnp.float16, None), (SHAPES[5], "indexer", jnp.bfloat16, None)]


# deterministic=False (default): dq summed by float32 atomics inside the
# KV-outer pass; True: the query-outer dq kernel (bitwise reproducible).
@pytest.mark.usefixtures("kernel_family")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
@pytest.mark.parametrize("shape,pattern,dtype,scale", _BWD_CASES)
def test_backward_matches_reference(shape, pattern, dtype, scale, deterministic):
    a = _inputs(zlib.crc32(repr((shape, pattern, "bwd")).encode()), shape, dtype,
                "hostile" if pattern == "empty rows" else pattern)
    if pattern == "empty rows":  # live rows that attend nothing: lse -inf, zero gradients
        ids = np.array(a["ids"])
        ids[:, 200:260] = -1
        a["ids"] = jnp.asarray(ids)
    rng = np.random.default_rng(8)
    weights = (jnp.asarray(rng.standard_normal(a["q"].shape), jnp.float32),
               jnp.asarray(rng.standard_normal(a["q"].shape[:3]), jnp.float32))
    lengths = dict(q_lengths=a["q_lengths"], kv_lengths=a["kv_lengths"])
    kernel = lambda q, k, v, scale: jax_msa.sparse_attention(q, k, v, a["ids"], scale=scale, return_lse=True,
                                                             implementation="kernel", deterministic=deterministic,
                                                             **lengths)
    fn = jax.jit(jax.grad(_loss(kernel, a, weights, scale), argnums=(0, 1, 2)))
    gpu = jax.device_put(a, GPU)
    assert "jax_msa_sparse_attention_bwd_cuda" in fn.lower(gpu["q"], gpu["k"], gpu["v"]).as_text()
    got = fn(gpu["q"], gpu["k"], gpu["v"])
    again = fn(gpu["q"], gpu["k"], gpu["v"])
    ref = lambda q, k, v, scale: reference.sparse_attention(q, k, v, a["ids"], scale=scale, return_lse=True, **lengths)
    f32 = {n: jax.device_put(a[n].astype(jnp.float32), CPU) for n in "qkv"}
    with jax.default_device(CPU):
        want = jax.jit(jax.grad(_loss(ref, a, weights, scale), argnums=(0, 1, 2)))(f32["q"], f32["k"], f32["v"])
    for name, g, g2, w in zip("qkv", got, again, want):
        assert g.dtype == dtype
        if deterministic or name != "q":  # dk, dv never use atomics
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g2, np.float32))
        assert rel_err(g, w) <= 3e-2, (name, rel_err(g, w))
    dq = np.asarray(got[0], np.float32)
    for b, length in enumerate(np.asarray(a["q_lengths"])):  # padded query rows: no gradient
        assert not np.any(dq[b, length:])
    if pattern == "empty rows":
        assert not np.any(dq[:, 200:260])


@pytest.mark.parametrize("pattern,query_wins", [("window", True), ("indexer", False)])
def test_default_backward_picks_its_dq_from_the_ids(pattern, query_wins, kernel_family):
    """The default backward enqueues both ways to dq behind device-side gates
    (schedule_gate.hpp): the query-outer dq kernel runs iff 93 * U < G * A (U:
    blocks in the unions of the query-outer tiles of 8 tokens, A: attended
    (token, slot) pairs). It wins on window ids, so the default gradients are
    bitwise those of deterministic=True; on indexer ids the fused dq serves (its
    float32 atomic sums differ from the deterministic ones in the last bits).
    The portable family has only the deterministic way: bitwise equal always."""
    a = jax.device_put(_inputs(9, (1, 8192, 8192, 16, 1, 16), jnp.bfloat16, pattern), GPU)
    ids = np.asarray(a["ids"])[0, :, 0]
    tiles = [t[t >= 0] for t in ids.reshape(-1, 8 * ids.shape[1])]
    union, attended = sum(len(np.unique(t)) for t in tiles), sum(len(t) for t in tiles)
    assert (93 * union < 16 * attended) == query_wins  # the premise, from the ids
    weights = (jnp.ones(a["q"].shape, jnp.float32), jnp.zeros(a["q"].shape[:3], jnp.float32))

    def grads(deterministic):
        kernel = lambda q, k, v, scale: jax_msa.sparse_attention(
            q, k, v, a["ids"], q_lengths=a["q_lengths"], kv_lengths=a["kv_lengths"], return_lse=True,
            implementation="kernel", deterministic=deterministic)
        return jax.jit(jax.grad(_loss(kernel, a, weights), argnums=(0, 1, 2)))(a["q"], a["k"], a["v"])

    default, det = grads(False), grads(True)
    for name, g, d in zip("qkv", default, det):
        g, d = np.asarray(g, np.float32), np.asarray(d, np.float32)
        if query_wins or name != "q" or kernel_family == "portable":  # dk, dv: deterministic either way
            np.testing.assert_array_equal(g, d, err_msg=name)
        else:
            assert not np.array_equal(g, d) and rel_err(g, d) <= 1e-2
