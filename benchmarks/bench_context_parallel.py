"""Context parallelism on real devices: sharded MSA == single-device MSA, and its speed.

    python benchmarks/bench_context_parallel.py --seq-len 32768 --json cp.json

Runs `jax_msa.context_parallel.ContextParallel(...).msa_attention` (forward and
gradients wrt q, k, v) over every visible device along the sequence, in
zig-zag and contiguous layouts, checks it against the same op on one device,
and times both (median of --iters runs, compile excluded).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jax_msa
from jax_msa import context_parallel as cp


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def median_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main(args: argparse.Namespace) -> dict:
    devices = jax.devices()
    n, t, hkv = len(devices), args.seq_len, args.kv_heads
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (1, t, args.heads, args.head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, hkv, args.head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, hkv, args.head_dim), jnp.bfloat16)
    qi = jax.random.normal(keys[3], (1, t, hkv, 128), jnp.bfloat16)
    ki = jax.random.normal(keys[4], (1, t, 128), jnp.bfloat16)
    w = jax.random.normal(keys[5], q.shape, jnp.float32)

    def loss(attention):
        return lambda q, k, v, qi, ki: jnp.sum(attention(q, k, v, qi, ki).astype(jnp.float32) * w)

    single = jax.jit(jax.value_and_grad(loss(lambda *a: jax_msa.msa_attention(*a, topk=args.topk)),
                                        argnums=(0, 1, 2)))
    ref_loss, ref_grads = single(q, k, v, qi, ki)
    ref_out = jax.jit(lambda *a: jax_msa.msa_attention(*a, topk=args.topk))(q, k, v, qi, ki)
    report = {"devices": [d.device_kind for d in devices], "seq_len": t, "heads": args.heads, "kv_heads": hkv,
              "single_device_ms": median_ms(single, q, k, v, qi, ki, iters=args.iters), "layouts": {}}
    mesh = Mesh(np.array(devices), ("context",))
    for layout in ("zigzag", "contiguous"):
        par = cp.ContextParallel(mesh, "context", layout=layout)
        # Inputs and the loss weights in layout order; gradients come back in it too.
        to = lambda x: cp.to_layout(x, n, layout)
        w_layout = to(w)
        sharded_loss = lambda q, k, v, qi, ki: jnp.sum(
            par.msa_attention(q, k, v, qi, ki, topk=args.topk).astype(jnp.float32) * w_layout)
        fn = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1, 2)))
        inputs = [to(x) for x in (q, k, v, qi, ki)]
        value, grads = fn(*inputs)
        grads = [cp.from_layout(g, n, layout) for g in grads]
        out = cp.from_layout(jax.jit(lambda *a: par.msa_attention(*a, topk=args.topk))(*inputs), n, layout)
        report["layouts"][layout] = {
            "out_rel_err": rel_err(out, ref_out),
            # A sum of random-signed terms: its relative error is inflated by cancellation.
            "loss_rel_err": abs(float(value) - float(ref_loss)) / abs(float(ref_loss)),
            "grad_rel_err": {name: rel_err(g, r) for name, g, r in zip("qkv", grads, ref_grads)},
            "ms": median_ms(fn, *inputs, iters=args.iters),
        }
    return report


if __name__ == "__main__":
    args = parse_args()
    result = main(args)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
