"""The SM90 dense attention forward and backward (skipped without a GPU): out
and lse, then dq, dk, dv (with a nonzero lse cotangent) against the float32
reference on random inputs, causal (bottom-right) or not, with unaligned and
padded lengths, GQA groups, bfloat16 and float16, head dims 128 and 64 (the
forward; the backward of D = 64 is the reference's); jit and vmap; the
fallbacks to the reference."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_msa
from jax_msa import reference
from jax_msa._primitives import NoKernelError
from helpers import assert_lse_close, first_gpu, GPU_ONLY, normal, rel_err, TOLERANCES

GPU = first_gpu()
CPU = jax.devices("cpu")[0]
pytestmark = GPU_ONLY
TARGET = "jax_msa_dot_product_attention_fwd"
TARGET_BWD = "jax_msa_dot_product_attention_bwd_cuda"

# (B, Sq, Sk, Hq, Hkv, lengths): GQA 16, 4 (8/2), 1 (4/4); Sq < Sk (chunked
# prefill, bottom-right); unaligned lengths 1, 77, 300, 1000; "random":
# row 0 full, the others random with q_len <= kv_len; "zeros": a row with
# q_len = 0 (and one with kv_len = 0 too).
SHAPES = [
    (2, 1000, 1000, 16, 1, "random"),
    (1, 300, 1000, 8, 2, "full"),
    (3, 77, 77, 4, 4, "random"),
    (1, 1, 300, 16, 1, "full"),
    (3, 300, 700, 8, 2, "zeros"),
    (2, 1, 1, 4, 4, "full"),
    (1, 1024, 1024, 4, 4, "full"),
    (2, 640, 1280, 16, 1, "random"),
]


def _lengths(rng, b, sq, sk, kind):
    ql = np.full(b, sq, np.int32)
    kl = np.full(b, sk, np.int32)
    if kind == "random":
        ql[1:] = rng.integers(1, sq + 1, b - 1)
        kl[1:] = [rng.integers(max(q, 1), sk + 1) for q in ql[1:]]
    elif kind == "zeros":
        ql[1], kl[1] = 0, int(rng.integers(1, sk + 1))
        ql[2], kl[2] = 0, 0
        ql[0] = sq - 37
    return jnp.asarray(ql), jnp.asarray(kl)


def _inputs(shape, dtype, d=128, seed=None):
    b, sq, sk, hq, hkv, kind = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, str(dtype), d)).encode()) if seed is None else seed)
    ql, kl = _lengths(rng, b, sq, sk, kind)
    q, k, v = (normal(rng, s, dtype) for s in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))
    return dict(q=q, k=k, v=v, q_lengths=ql, kv_lengths=kl)


def _reference(a, causal, scale=None):
    """The float32 reference, on the CPU."""
    a = jax.device_put({n: x.astype(jnp.float32) if n in "qkv" else x for n, x in a.items()}, CPU)
    with jax.default_device(CPU):
        return reference.dot_product_attention(a["q"], a["k"], a["v"], causal=causal, q_lengths=a["q_lengths"],
                                               kv_lengths=a["kv_lengths"], scale=scale, return_lse=True)


def _kernel(a, causal, scale=None, implementation="kernel"):
    fn = lambda q, k, v, ql, kl: jax_msa.dot_product_attention(
        q, k, v, causal=causal, q_lengths=ql, kv_lengths=kl, scale=scale, return_lse=True,
        implementation=implementation)
    args = [jax.device_put(a[n], GPU) for n in ("q", "k", "v", "q_lengths", "kv_lengths")]
    assert TARGET in jax.jit(fn).lower(*args).as_text()
    return jax.jit(fn)(*args)


def _check(out, lse, ref_out, ref_lse, a, dtype, rtol=None):
    default_rtol, atol = TOLERANCES[dtype]
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert rel_err(out, ref_out) <= (rtol or default_rtol), rel_err(out, ref_out)
    assert_lse_close(lse, ref_lse, atol)
    ql = np.asarray(a["q_lengths"])
    for b in range(out.shape[0]):  # padded rows: zeros and -inf
        assert not np.any(np.asarray(out[b, ql[b]:], np.float32))
        assert np.all(np.isneginf(np.asarray(lse[b, ql[b]:])))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}_{s[3]}-{s[4]}_{s[5]}" for s in SHAPES])
def test_forward_matches_reference(shape, causal, dtype):
    a = _inputs(shape, dtype)
    out, lse = _kernel(a, causal)
    _check(out, lse, *_reference(a, causal), a, dtype)


@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}_{s[3]}-{s[4]}_{s[5]}" for s in SHAPES])
def test_portable_forward_matches_reference(shape, causal, d, monkeypatch):
    """The portable family's forward (mma.sync; kernel_family.h), forced with
    JAX_MSA_KERNELS=portable on this card."""
    monkeypatch.setenv("JAX_MSA_KERNELS", "portable")
    a = _inputs(shape, jnp.bfloat16, d=d)
    out, lse = _kernel(a, causal)
    _check(out, lse, *_reference(a, causal), a, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4], (1, 2048, 2048, 4, 1, "full")])
def test_forward_head_dim_64(shape, causal, dtype):
    a = _inputs(shape, dtype, d=64)
    out, lse = _kernel(a, causal)
    _check(out, lse, *_reference(a, causal), a, dtype)


def test_forward_negative_scale_and_large_logits():
    """A negative logit scale (OnlineSoftmax's negation) and a large one (the
    running max moves often: lazy rescaling of O)."""
    a = _inputs((1, 900, 900, 16, 1, "full"), jnp.float16)
    for scale in (-0.05, 0.5):
        for causal in (True, False):
            out, lse = _kernel(a, causal, scale=scale)
            _check(out, lse, *_reference(a, causal, scale=scale), a, jnp.float16, rtol=1e-2)


def test_forward_long_sequence_bf16():
    """Many key blocks per tile (the ring wraps many times) and many tiles."""
    a = _inputs((1, 4096, 4096, 2, 1, "full"), jnp.bfloat16)
    for causal in (True, False):
        out, lse = _kernel(a, causal)
        _check(out, lse, *_reference(a, causal), a, jnp.bfloat16)


def test_jit_vmap():
    """vmap folds its axis into the batch: the same as one call per member."""
    shape = (2, 300, 500, 8, 2, "random")
    members = [_inputs(shape, jnp.bfloat16, seed=s) for s in (1, 2)]
    stacked = {n: jnp.stack([m[n] for m in members]) for n in members[0]}
    fn = jax.jit(jax.vmap(lambda q, k, v, ql, kl: jax_msa.dot_product_attention(
        q, k, v, q_lengths=ql, kv_lengths=kl, return_lse=True, implementation="kernel")))
    args = [jax.device_put(stacked[n], GPU) for n in ("q", "k", "v", "q_lengths", "kv_lengths")]
    assert TARGET in fn.lower(*args).as_text()
    out, lse = fn(*args)
    for i, m in enumerate(members):
        _check(out[i], lse[i], *_reference(m, True), m, jnp.bfloat16)


def _loss(attention, w_out, w_lse):
    """A scalar of both out and lse, so that dout and dlse are random and
    nonzero (lse of rows that see nothing, -inf, left out)."""
    def fn(q, k, v):
        out, lse = attention(q, k, v)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse)
    return fn


def _grads(a, causal, implementation="kernel", scale=None, kernel_bwd=True):
    """dq, dk, dv of the kernels on the GPU and of the float32 reference on the CPU."""
    rng = np.random.default_rng(3)
    w_out = jnp.asarray(rng.standard_normal(a["q"].shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(a["q"].shape[:3]), jnp.float32)
    lengths = dict(q_lengths=a["q_lengths"], kv_lengths=a["kv_lengths"])
    ours = jax.jit(jax.grad(_loss(lambda q, k, v: jax_msa.dot_product_attention(
        q, k, v, causal=causal, scale=scale, return_lse=True, implementation=implementation, **lengths),
        w_out, w_lse), argnums=(0, 1, 2)))
    gpu = [jax.device_put(a[n], GPU) for n in "qkv"]
    hlo = ours.lower(*gpu).as_text()
    assert TARGET in hlo
    assert (TARGET_BWD in hlo) == kernel_bwd
    got = ours(*gpu)
    f32 = [jax.device_put(a[n].astype(jnp.float32), CPU) for n in "qkv"]
    with jax.default_device(CPU):
        want = jax.jit(jax.grad(_loss(lambda q, k, v: reference.dot_product_attention(
            q, k, v, causal=causal, scale=scale, return_lse=True, **lengths), w_out, w_lse),
            argnums=(0, 1, 2)))(*f32)
    return got, want


def _check_grads(got, want, a, dtype, rtol=3e-2):
    ql, kl = np.asarray(a["q_lengths"]), np.asarray(a["kv_lengths"])
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype
        assert rel_err(g, w) <= rtol, (name, rel_err(g, w))
        g = np.asarray(g, np.float32)
        for b in range(g.shape[0]):  # padded rows / keys: exact zeros
            assert not np.any(g[b, (ql if name == "q" else kl)[b]:]), (name, b)


@pytest.mark.usefixtures("kernel_family")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}_{s[3]}-{s[4]}_{s[5]}" for s in SHAPES])
def test_backward_matches_reference(shape, causal, dtype):
    a = _inputs(shape, dtype)
    _check_grads(*_grads(a, causal), a, dtype)


@pytest.mark.usefixtures("kernel_family")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(1, 4096, 4096, 16, 1, "full"), (2, 1500, 2900, 8, 2, "random"),
                                   (1, 2048, 2048, 2, 2, "full"), (1, 700, 700, 64, 1, "full")])
def test_backward_long_and_wide_groups(shape, causal):
    """Many tiles per key block (buckets split between CTAs: partial sums),
    and the largest group (64 heads: one token per tile)."""
    a = _inputs(shape, jnp.bfloat16)
    _check_grads(*_grads(a, causal), a, jnp.bfloat16)


@pytest.mark.usefixtures("kernel_family")
def test_backward_negative_scale():
    a = _inputs((1, 900, 900, 8, 2, "random"), jnp.float16)
    for causal in (True, False):
        _check_grads(*_grads(a, causal, scale=-0.05), a, jnp.float16)


@pytest.mark.usefixtures("kernel_family")
def test_backward_dk_dv_deterministic():
    """dk / dv: fixed summation order (dq's float32 atomic sums may vary)."""
    a = _inputs((1, 3000, 3000, 16, 1, "full"), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax_msa.dot_product_attention(
        q, k, v, implementation="kernel").astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    gpu = [jax.device_put(a[n], GPU) for n in "qkv"]
    first, second = f(*gpu), f(*gpu)
    for i in (1, 2):
        assert np.array_equal(np.asarray(first[i]), np.asarray(second[i]))
    assert rel_err(first[0], second[0]) <= 1e-2


@pytest.mark.usefixtures("kernel_family")
def test_backward_head_dim_64_falls_back():
    """D = 64: the kernel forward, the reference backward ("auto")."""
    a = _inputs((2, 333, 555, 8, 2, "random"), jnp.bfloat16, d=64)
    _check_grads(*_grads(a, True, implementation="auto", kernel_bwd=False), a, jnp.bfloat16)


def test_other_dtypes_and_head_dims_fall_back():
    """float32 and D = 96 have no kernel: "auto" runs the reference, "kernel" raises."""
    for dtype, d in ((jnp.float32, 128), (jnp.bfloat16, 96)):
        a = _inputs((1, 200, 200, 4, 2, "full"), dtype, d=d)
        args = [jax.device_put(a[n], GPU) for n in "qkv"]
        auto = jax.jit(lambda q, k, v: jax_msa.dot_product_attention(q, k, v, return_lse=True))
        assert TARGET not in auto.lower(*args).as_text()
        out, lse = auto(*args)
        ref_out, ref_lse = _reference(a, True)
        assert rel_err(out, ref_out) <= TOLERANCES[dtype][0]
        with pytest.raises(NoKernelError):
            jax.jit(lambda q, k, v: jax_msa.dot_product_attention(q, k, v, implementation="kernel")).lower(*args)
