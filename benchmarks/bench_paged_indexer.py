"""Benchmark of paged_indexer (spec §3.7, issue 4) on one GPU.

Decode over a paged index-key cache: per case (batch B, context T = kv_length
of every request, index heads Hi, cache dtype), Q new tokens per request
(default 8), Di = 128, topk 16, bf16 qi; every request's page table is a slice
of a random permutation of the physical pages. Times:
  paged_indexer  jax_msa.paged_indexer (block scores + selection)
  scores         its first step alone (the hidden paged_indexer_scores)
  select         its second step alone (indexer_select) on precomputed scores
  reference      the pure-JAX paged_indexer, where B * T <= --reference-max
  copy           a device copy (jitted x + 1 over a --copy-gib int32 buffer,
                 read + write bytes counted): the card's copy bandwidth,
                 measured in the same run
Bytes: paged_indexer and reference count the index keys visible to the
requests (B * T * Di * element size), qi and the ids written; scores counts
the keys, qi and the scores written; select the scores read and the ids
written. GB/s = bytes / time; of_copy = GB/s / the copy's GB/s.
Method (spec §7): random inputs, rotated over several input sets (whole
caches where they are small, so that L2 never holds them); compile and
warm-up excluded; each sample runs the op `reps` times back to back (reps
chosen so that a sample lasts >= --min-sample-ms) and waits with
block_until_ready; the reported time is the median over --samples samples,
divided by reps. Cases whose caches do not fit in device memory are skipped.

  python benchmarks/bench_paged_indexer.py --json out.json --tsv out.tsv
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
from timing import announce_device, copy_ms, fmt, median_ms, write_results  # noqa: E402  (benchmarks/timing.py, shared)

BLOCK = 128
# The hidden primitives of paged_indexer on CUDA, timed alone where this build has them.
_HIDDEN = None
if jax.default_backend() == "gpu" and jax_msa._ffi.has_kernel("jax_msa_paged_indexer_scores", "cuda"):
    _HIDDEN = sys.modules["jax_msa.paged"]
# Whole caches per rotation set, up to this many bytes over all sets.
_ROTATION_BYTES = 1 << 29


def _random_cache(key, shape, dtype):
    """Random index keys in `dtype` and their scale (e4m3: scaled to its range)."""
    keys = jax.random.normal(key, shape, jnp.bfloat16)
    if dtype != jnp.float8_e4m3fn:
        return keys.astype(dtype), jnp.float32(1.0)
    scale = 4.0 / 448.0
    return (keys / scale).astype(dtype), jnp.float32(scale)


def _fits(nbytes: int) -> bool:
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return limit is None or nbytes <= 0.7 * limit


def run(args) -> list[dict]:
    rows = []
    ms, nbytes = copy_ms(args.copy_gib, args.seed + 1, args.samples, args.min_sample_ms, args.warmup)
    copy = nbytes / ms / 1e6
    rows.append(dict(op="copy", B=0, T=0, Hi=0, cache="int32", ms=ms, bytes=nbytes, gbps=copy, of_copy=1.0))
    _print(rows[-1])
    q, di, topk = args.queries, args.dim, args.topk
    key = jax.random.PRNGKey(args.seed)
    for cache_name in args.caches:
        cache_dtype = jnp.dtype(cache_name)
        for b in args.batch:
            for t in args.context:
                max_pages = -(-t // BLOCK)
                num_pages = b * max_pages
                cache_bytes = num_pages * BLOCK * di * cache_dtype.itemsize
                n_sets = max(1, min(4, _ROTATION_BYTES // cache_bytes))
                if not _fits(n_sets * cache_bytes + num_pages * BLOCK * di * 2):  # + the bf16 draw
                    print(f"skip: cache {cache_name} B={b} T={t} ({cache_bytes / 2**30:.1f} GiB) does not fit")
                    continue
                keys = jax.random.split(jax.random.fold_in(key, b * 1_000_003 + t), 2 * n_sets)
                caches = [_random_cache(keys[i], (num_pages, BLOCK, di), cache_dtype) for i in range(n_sets)]
                tables = [jnp.asarray(np.random.default_rng(args.seed + i).permutation(num_pages).reshape(b, max_pages),
                                      jnp.int32) for i in range(n_sets)]
                kv = jnp.full((b,), t, jnp.int32)
                ql = jnp.full((b,), q, jnp.int32)
                visible = b * t * di * cache_dtype.itemsize
                for hi in args.heads:
                    sets = [(jax.random.normal(keys[n_sets + i], (b, q, hi, di), jnp.bfloat16), *caches[i],
                             tables[i]) for i in range(n_sets)]
                    qi_bytes, ids_bytes = b * q * hi * di * 2, b * q * hi * topk * 4
                    scores_bytes = b * q * hi * max_pages * 4
                    case = dict(B=b, T=t, Hi=hi, cache=cache_name)
                    ops = {"paged_indexer": (_indexer_fn(topk, kv, "auto"), visible + qi_bytes + ids_bytes)}
                    if b * t <= args.reference_max:
                        ops["reference"] = (_indexer_fn(topk, kv, "reference"), visible + qi_bytes + ids_bytes)
                    if _HIDDEN is not None:
                        ops["scores"] = (_scores_fn(di, ql, kv), visible + qi_bytes + scores_bytes)
                    for name, (fn, nbytes) in ops.items():
                        ms = median_ms(jax.jit(fn), sets, args.samples, args.min_sample_ms, args.warmup)
                        rows.append(dict(op=name, **case, ms=ms, bytes=nbytes, gbps=nbytes / ms / 1e6,
                                         of_copy=nbytes / ms / 1e6 / copy))
                        _print(rows[-1])
                    if _HIDDEN is not None:
                        score_sets = [(jax.block_until_ready(jax.jit(_scores_fn(di, ql, kv))(*s)),) for s in sets[:2]]
                        fn = lambda s: _HIDDEN._indexer_select_p.bind(s, ql, kv, topk=np.int64(topk),
                                                                      implementation="kernel")[0]
                        ms = median_ms(jax.jit(fn), score_sets, args.samples, args.min_sample_ms, args.warmup)
                        nbytes = scores_bytes + ids_bytes
                        rows.append(dict(op="select", **case, ms=ms, bytes=nbytes, gbps=nbytes / ms / 1e6,
                                         of_copy=nbytes / ms / 1e6 / copy))
                        _print(rows[-1])
                        del score_sets
                    del sets
                del caches, tables
    return rows


def _indexer_fn(topk, kv, implementation):
    return lambda qi, ki_cache, ki_scale, table: jax_msa.paged_indexer(
        qi, ki_cache, table, kv, topk=topk, ki_scale=ki_scale, implementation=implementation)


def _scores_fn(di, ql, kv):
    return lambda qi, ki_cache, ki_scale, table: _HIDDEN._scores_p.bind(
        ki_cache, ki_scale, qi, table, ql, kv, scale=np.float32(di**-0.5), implementation="kernel")[0]


def _print(row):
    print(f"{row['op']:>14} {row['cache']:>14} B={row['B']:>4} T={row['T']:>7} Hi={row['Hi']} "
          f"{fmt(row['ms'], '9.4f')} ms {row['gbps']:9.1f} GB/s  of_copy={row['of_copy']:.3f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--queries", type=int, default=8, help="new tokens per request (Q)")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--caches", nargs="+", default=["bfloat16", "float8_e4m3fn"])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-sample-ms", type=float, default=5.0)
    parser.add_argument("--reference-max", type=int, default=1 << 18,
                        help="largest B * T timed for the reference")
    parser.add_argument("--copy-gib", type=float, default=1.0, help="size of the copied buffer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--tsv", help="write the rows here")
    args = parser.parse_args(argv)
    meta = dict(announce_device(), queries=args.queries, dim=args.dim, topk=args.topk)
    rows = run(args)
    write_results(args.json, args.tsv, meta, rows, ("op", "cache", "B", "T", "Hi", "ms", "bytes", "gbps", "of_copy"))


if __name__ == "__main__":
    main()
