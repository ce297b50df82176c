"""Benchmark of the prefill indexer (spec §3.3, issue 4) on one GPU.

Times, per sequence length T (B = 1, causal, Sq = Sk = T) and index head count
Hi, with Di = 128 and bf16 inputs:
  indexer       jax_msa.indexer (block scores + top-k, fused op)
  block_scores  jax_msa.block_scores alone (scores written to memory)
  topk_select   jax_msa.topk_select alone (the public op's CTA-per-row kernel), on precomputed scores
  indexer_scores, indexer_select
                the two steps of the indexer on CUDA alone (block scores without
                the -inf fill; the warp-per-row top-k), where this build has them
  reference     the pure-JAX indexer (implementation="reference"), T <= --reference-max
  cudnn         jax.nn.dot_product_attention(implementation="cudnn", is_causal=True),
                16 query heads / 1 KV head, D = 128: dense attention at the same T
Method (spec §7): random normal inputs, rotated over several input sets;
compile and warm-up excluded; each sample runs the op `reps` times back to
back (reps chosen so that a sample lasts >= --min-sample-ms) and waits with
block_until_ready; the reported time is the median over >= --samples samples,
divided by reps. TFLOP/s count useful FLOPs only: indexer 2*Di*Hi*pairs,
dense attention 4*D*Hq*pairs, with pairs = T(T+1)/2 causal (query, key) pairs.

  python benchmarks/bench_indexer.py --json out.json --tsv out.tsv
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_msa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import announce_device, fmt, median_ms, normal, write_results  # noqa: E402  (benchmarks/timing.py, shared)


# The hidden primitives of the CUDA indexer (indexer_scores, indexer_select),
# timed alone where this build has them.
_HIDDEN = sys.modules["jax_msa.indexer"]
if jax.default_backend() != "gpu" or not jax_msa._ffi.has_kernel("jax_msa_indexer_scores", "cuda"):
    _HIDDEN = None


def _lengths(q, k):
    """Full lengths [1] (B = 1, Sq = Sk)."""
    t = q.shape[1]
    return jnp.full((1,), t, jnp.int32), jnp.full((1,), t, jnp.int32)


def run(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    rows = []
    key = jax.random.PRNGKey(args.seed)
    for t in args.seq:
        pairs = t * (t + 1) // 2
        dense = None
        if not args.no_cudnn:
            keys = jax.random.split(jax.random.fold_in(key, t), 3 * args.rotate)
            sets = [tuple(normal(keys[3 * i + j], (1, t, h, 128), dtype) for j, h in enumerate((16, 1, 1)))
                    for i in range(args.rotate)]
            fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
            ms = median_ms(fn, sets, args.samples, args.min_sample_ms, args.warmup)
            dense = ms
            rows.append(dict(op="cudnn_dense_attention", T=t, Hi=0, Di=128, ms=ms,
                             tflops=4 * 128 * 16 * pairs / ms / 1e9, vs_cudnn=1.0))
            _print(rows[-1])
            del sets
        for hi in args.heads:
            di = args.dim
            keys = jax.random.split(jax.random.fold_in(key, 1000 * t + hi), 2 * args.rotate)
            sets = [(normal(keys[2 * i], (1, t, hi, di), dtype), normal(keys[2 * i + 1], (1, t, di), dtype))
                    for i in range(args.rotate)]
            flops = 2 * di * hi * pairs
            ops = {
                "indexer": jax.jit(lambda qi, ki: jax_msa.indexer(qi, ki, topk=args.topk)),
                "block_scores": jax.jit(lambda qi, ki: jax_msa.block_scores(qi, ki)),
            }
            if t <= args.reference_max:
                ops["reference_indexer"] = jax.jit(
                    lambda qi, ki: jax_msa.indexer(qi, ki, topk=args.topk, implementation="reference"))
            for name, fn in ops.items():
                ms = median_ms(fn, sets, args.samples, args.min_sample_ms, args.warmup)
                rows.append(dict(op=name, T=t, Hi=hi, Di=di, ms=ms, tflops=flops / ms / 1e9,
                                 vs_cudnn=None if dense is None else dense / ms))
            if _HIDDEN is not None:  # the two steps of the indexer on CUDA, alone
                fn = jax.jit(lambda qi, ki: _HIDDEN._indexer_scores_p.bind(
                    qi, ki, *_lengths(qi, ki), scale=np.float32(di**-0.5), with_sums=False, implementation="kernel"))
                ops["indexer_scores"] = fn
                ms = median_ms(fn, sets, args.samples, args.min_sample_ms, args.warmup)
                rows.append(dict(op="indexer_scores", T=t, Hi=hi, Di=di, ms=ms, tflops=flops / ms / 1e9,
                                 vs_cudnn=None if dense is None else dense / ms))
            score_sets = [(jax.block_until_ready(ops["block_scores"](*s)),) for s in sets[:2]]
            del sets
            selections = {"topk_select": lambda s: jax_msa.topk_select(s, topk=args.topk)}
            if _HIDDEN is not None:
                selections["indexer_select"] = lambda s: _HIDDEN._indexer_select_p.bind(
                    s, *_lengths(s, s), topk=np.int64(args.topk), implementation="kernel")
            for name, fn in selections.items():
                ms = median_ms(jax.jit(fn), score_sets, args.samples, args.min_sample_ms, args.warmup)
                rows.append(dict(op=name, T=t, Hi=hi, Di=di, ms=ms, tflops=None,
                                 vs_cudnn=None if dense is None else dense / ms))
            del score_sets
            for row in rows[-(len(ops) + len(selections)):]:
                _print(row)
    return rows


def _print(row):
    print(f"{row['op']:>22} T={row['T']:>7} Hi={row['Hi']} {row['ms']:10.3f} ms "
          f"{fmt(row['tflops'], '8.1f')} TFLOP/s  cudnn/this={fmt(row['vs_cudnn'], '.2f')}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rotate", type=int, default=3, help="input sets cycled through")
    parser.add_argument("--min-sample-ms", type=float, default=5.0)
    parser.add_argument("--reference-max", type=int, default=32768, help="largest T timed for the reference")
    parser.add_argument("--no-cudnn", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--tsv", help="write the rows here")
    args = parser.parse_args(argv)
    meta = dict(announce_device(), dtype=args.dtype, topk=args.topk)
    rows = run(args)
    write_results(args.json, args.tsv, meta, rows, ("op", "T", "Hi", "Di", "ms", "tflops", "vs_cudnn"))


if __name__ == "__main__":
    main()
