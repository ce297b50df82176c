"""Small block-sparse attention cases for compute-sanitizer (not a pytest module).

    compute-sanitizer --tool memcheck python3 tests/memcheck_sparse.py

Runs the SM90 sparse kernels (both forward schedules, a by-block forward over
three chunks, the backward) on small unaligned GQA shapes with padded rows and
hostile ids (huge, negative, past the local block), and checks each result
against the float32 reference computed on the CPU, so that only the kernels
run under the sanitizer. Exits non-zero on a mismatch; the sanitizer reports
any out-of-bounds access."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jax_msa
from jax_msa import reference

CPU = jax.devices("cpu")[0]


def _case(seed: int, b: int, sq: int, sk: int, hq: int, hkv: int, topk: int, q_lengths, kv_lengths):
    """q, k, v [B, S, H, 128] bf16, ids [B, Sq, Hkv, topk] (distinct per row, hostile), lengths."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
               for s in ((b, sq, hq, 128), (b, sk, hkv, 128), (b, sk, hkv, 128)))
    span = topk + 5
    ids = np.argsort(rng.random((b, sq, hkv, span)), axis=-1)[..., :topk].astype(np.int32) - 3
    ids[0, :5] = 2**31 - 1
    ids[1, 7:20] = -2**31
    return q, k, v, jnp.asarray(ids), jnp.asarray(q_lengths, jnp.int32), jnp.asarray(kv_lengths, jnp.int32)


def _on_cpu(*xs):
    return [jax.device_put(x, CPU) for x in xs]


def check_forward(case, schedule: str, label: str) -> None:
    q, k, v, ids, ql, kl = case
    out = jax.jit(lambda *a: jax_msa.sparse_attention(
        *a[:4], q_lengths=a[4], kv_lengths=a[5], implementation="kernel", schedule=schedule))(*case)
    with jax.default_device(CPU):
        qc, kc, vc, idc, qlc, klc = _on_cpu(*case)
        ref = reference.sparse_attention(qc.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32),
                                         idc, q_lengths=qlc, kv_lengths=klc)
    err = float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref))))
    print(f"{label}: forward ({schedule}) max abs err {err:.4f}", flush=True)
    assert err < 0.05, (label, schedule, err)


def check_backward(case, label: str) -> None:
    q, k, v, ids, ql, kl = case
    w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)

    def loss(q, k, v, implementation):
        o = jax_msa.sparse_attention(q, k, v, ids, q_lengths=ql, kv_lengths=kl, implementation=implementation)
        return jnp.sum(o.astype(jnp.float32) * w)

    grads = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, "kernel"), argnums=(0, 1, 2)))(q, k, v)
    with jax.default_device(CPU):
        ids_c, ql_c, kl_c, w_c = _on_cpu(ids, ql, kl, w)

        def ref_loss(q, k, v):
            o = reference.sparse_attention(q, k, v, ids_c, q_lengths=ql_c, kv_lengths=kl_c)
            return jnp.sum(o * w_c)

        ref = jax.grad(ref_loss, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in _on_cpu(q, k, v)))
    for name, g, r in zip("qkv", grads, ref):
        r = np.asarray(r)
        err = float(np.max(np.abs(np.asarray(g, np.float32) - r))) / max(float(np.max(np.abs(r))), 1e-6)
        print(f"{label}: d{name} max abs err / max |ref| {err:.4f}", flush=True)
        assert err < 0.05, (label, name, err)


def main() -> None:
    small = _case(3, 2, 333, 517, 8, 2, 7, [333, 200], [517, 300])
    for schedule in ("block", "query"):
        check_forward(small, schedule, "B=2 Sq=333 Sk=517 8:2 topk=7")
    check_backward(small, "B=2 Sq=333 Sk=517 8:2 topk=7")
    # B * Hq * D * 2 = 64 KiB of Q per token: the by-block forward takes 3 chunks.
    chunks = _case(5, 4, 1100, 1300, 64, 4, 9, [1100, 700, 1, 1050], [1300, 900, 100, 1250])
    check_forward(chunks, "block", "B=4 Sq=1100 Sk=1300 64:4 topk=9")
    print("memcheck cases: all match the reference")


if __name__ == "__main__":
    main()
