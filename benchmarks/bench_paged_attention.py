"""Benchmark of paged_attention (spec §3.7, issue 7) on one GPU.

Decode / MTP over a paged KV cache [num_pages, Hkv, 128, D]: per case (batch
B, context T = kv_length of every request), Q new queries per request
(default 8), Hq:Hkv heads (default 16:1), D = 128, bf16 queries, random page
tables (every request's pages a slice of a random permutation of the pool).
Modes:
  dense-fp8    e4m3 caches (k_scale 0.25, v_scale 0.5), every visible page
  dense-bf16   bfloat16 caches, every visible page
  sparse-fp8   e4m3 caches, ids [B, Q, Hkv, topk]: per query the local page
               last and topk - 1 earlier pages, chosen at random. By default
               (--sparse-overlap shared) the Q queries of a request share the
               same topk - 1 earlier pages, as the queries of one request do
               in a real model; --sparse-overlap independent draws them per
               query.
  (sparse-bf16 can be asked for with --modes.)
Peers, timed in the same run on the same card (unless --skip-peers); 'n/a'
when they fail to import, compile or run:
  cudnn        jax.nn.dot_product_attention(implementation="cudnn") on the
               contiguous bf16 equivalent (q [B, Q, Hq, D], k/v [B, T, Hkv, D],
               not causal); skipped where it does not fit
  pallas       JAX's Pallas GPU paged_attention
               (jax.experimental.pallas.ops.gpu.paged_attention), bf16 pages,
               one query per request
  copy         a device copy (jitted x + 1 over a --copy-gib int32 buffer,
               read + write bytes counted): the card's copy bandwidth
Bytes: the distinct K and V cache bytes the op must read: every visible page
once per (request, kv head) for dense (and the peers); the union of the
selected pages per (request, kv head) for sparse (averaged over the rotated
id sets). Queries and outputs are not counted. GB/s = bytes / time;
of_copy = GB/s / the copy's GB/s; speedup (sparse rows) = the dense-fp8 time
at the same (B, T) / this time.
Method (spec §7): random data (never zeros); caches generated on the device
(random e4m3 / bf16 bit patterns of magnitude in [0.5, 2), no NaN); rotated
over several page tables on a pool of disjoint page sets (>= 2 when they fit,
up to --max-sets, enough to exceed L2 several times; sparse rows also rotate
their ids); compile and warm-up excluded; each jitted call runs the op on
--layers consecutive input sets (default 8, as one decode step runs every
layer's attention; a call of one ~30 us op would time JAX's dispatch, not the
GPU); each sample makes `reps` such calls back to back (a sample lasts >=
--min-sample-ms) and waits with block_until_ready; the reported time is the
median over --samples samples, divided by reps and by --layers. Arrays are
freed between cases.

  python benchmarks/bench_paged_attention.py --json out.json --tsv out.tsv
  JAX_PLATFORMS=cpu python benchmarks/bench_paged_attention.py --batch 2 --context 4096 --samples 2 --skip-peers
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
DIM = 128
L2_BYTES = 50 << 20  # H100 / H200: 50 MB
MODES = ("dense-fp8", "dense-bf16", "sparse-fp8", "sparse-bf16")
DEFAULT_MODES = ("dense-fp8", "dense-bf16", "sparse-fp8")
FP8_SCALES = dict(k_scale=0.25, v_scale=0.5)
COLUMNS = ("op", "B", "T", "Q", "Hq", "Hkv", "topk", "sets", "ms", "bytes", "gbps", "of_copy", "speedup", "note")


# Inputs -------------------------------------------------------------------------------------------------------------

def _random_values(key, shape, dtype):
    """Random values of magnitude in [0.5, 2) and random sign, drawn as bit
    patterns on the device (no float32 intermediate; never zero, inf or NaN)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float8_e4m3fn:  # s eeee mmm: exponent field 6 or 7
        bits = (jax.random.bits(key, shape, jnp.uint8) & 0x8F) | 0x30
    elif dtype == jnp.bfloat16:  # s eeeeeeee mmmmmmm: exponent field 126 or 127
        bits = (jax.random.bits(key, shape, jnp.uint16) & 0x80FF) | 0x3F00
    elif dtype == jnp.float16:  # s eeeee mmmmmmmmmm: exponent field 14 or 15
        bits = (jax.random.bits(key, shape, jnp.uint16) & 0x87FF) | 0x3800
    else:
        return jax.random.uniform(key, shape, dtype, 0.5, 2.0)
    return jax.lax.bitcast_convert_type(bits, dtype)


def _rows_per_chunk(rows: int, row_size: int, limit: int = 1 << 24) -> int:
    """The largest divisor of `rows` whose rows hold at most `limit` elements (at least 1)."""
    best = 1
    for d in range(1, min(rows, max(1, limit // max(1, row_size))) + 1):
        if rows % d == 0:
            best = d
    return best


def random_values(key, shape, dtype) -> jax.Array:
    """_random_values, generated in chunks of the leading axis (lax.map): the
    random-bit generator's temporaries stay chunk-sized, not cache-sized."""
    shape, dtype = tuple(shape), jnp.dtype(dtype)
    rows = _rows_per_chunk(shape[0], int(np.prod(shape[1:])))

    @jax.jit
    def fn(key):
        keys = jax.random.split(key, shape[0] // rows)
        return jax.lax.map(lambda k: _random_values(k, (rows, *shape[1:]), dtype), keys).reshape(shape)

    return fn(key)


def sparse_ids(rng, b, nq, hkv, topk, t, independent) -> np.ndarray:
    """ids [B, Q, Hkv, topk]: per query the local page last after topk - 1
    distinct earlier pages (-1 padded where there are fewer). Shared: the
    queries of one (request, kv head) take the same earlier pages (among the
    pages before the first query's local page; a query whose local page is
    later takes the pages in between first); independent: drawn per query."""
    local = (t - nq + np.arange(nq)) // BLOCK  # [Q] local page of each query (kv_length t for every request)
    ids = np.full((b, nq, hkv, topk), -1, np.int32)
    if independent:
        for i in range(nq):
            n = min(topk - 1, int(local[i]))
            if n:
                ids[:, i, :, :n] = np.argsort(rng.random((b, hkv, int(local[i]))), axis=-1)[..., :n]
            ids[:, i, :, n] = local[i]
    else:
        first = int(local[0])
        shared = np.argsort(rng.random((b, hkv, first)), axis=-1)[..., :topk - 1]
        for i in range(nq):
            # A query past a page boundary takes the pages since `first` (most
            # recent first), then the shared ones (all before `first`).
            recent = np.broadcast_to(np.arange(local[i] - 1, first - 1, -1), (b, hkv, local[i] - first))
            earlier = np.concatenate([recent, shared], axis=-1)[..., :topk - 1]
            n = earlier.shape[-1]
            ids[:, i, :, :n] = earlier
            ids[:, i, :, n] = local[i]
    return ids


def distinct_pages(ids: np.ndarray) -> int:
    """Distinct valid pages per (request, kv head), summed."""
    b, _, hkv, _ = ids.shape
    total = 0
    for r in range(b):
        for g in range(hkv):
            row = ids[r, :, g].ravel()
            total += len(np.unique(row[row >= 0]))
    return total


# Memory -------------------------------------------------------------------------------------------------------------

def _free_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None:
        return None
    return limit - stats.get("bytes_in_use", 0)


def _fits(nbytes: int) -> bool:
    free = _free_bytes()
    return free is None or nbytes <= 0.8 * free


def _free(*arrays) -> None:
    """Deletes device buffers now (instead of whenever Python lets go of them)."""
    for x in arrays:
        for leaf in jax.tree_util.tree_leaves(x):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()


def _rotation(set_bytes: int, max_sets: int, extra: int = 0) -> int:
    """How many input sets of set_bytes to rotate: enough to exceed 4x L2, at
    least 2 where they fit (else 1), at most max_sets; 0 if one does not fit."""
    n = max(2, min(max_sets, -(-4 * L2_BYTES // max(1, set_bytes))))
    while n > 1 and not _fits(n * set_bytes + extra):
        n -= 1
    return n if _fits(n * set_bytes + extra) else 0


# Timed ops ----------------------------------------------------------------------------------------------------------

def _time(fn, sets, args) -> float:
    """Median ms of one op. With --layers L > 1 each jitted call runs the op L
    times on consecutive input sets, as a decode step runs its layers, and the
    time is the call's / L: one op per call would time JAX's dispatch (tens of
    us) instead of the GPU when the op is shorter than that."""
    layers = args.layers
    if layers == 1:
        return median_ms(jax.jit(fn), sets, args.samples, args.min_sample_ms, args.warmup)
    step = jax.jit(lambda *ops: [fn(*inputs) for inputs in ops])
    calls = [tuple(sets[(i * layers + j) % len(sets)] for j in range(layers)) for i in range(len(sets))]
    return median_ms(step, calls, args.samples, args.min_sample_ms, args.warmup) / layers


def _paged_fn(implementation, scales, kv):
    def fn(q, k_cache, v_cache, table, ids=None):
        return jax_msa.paged_attention(q, k_cache, v_cache, table, kv, ids, implementation=implementation, **scales)
    return fn


def _pallas_table(table: np.ndarray, k_splits: int = 16, block: int = 8) -> np.ndarray:
    """The Pallas kernel wants pages_per_sequence divisible by k_splits, and
    its partitions by pages_per_compute_block where they are longer: pad with
    page 0 (past the lengths, never attended)."""
    b, pages = table.shape
    per = -(-pages // k_splits)
    if per > block:
        per = -(-per // block) * block
    return np.pad(table, ((0, 0), (0, k_splits * per - pages)))


def _pallas_fn(pallas_paged, hkv, kv):
    """fn(q [B, Hq, D], k, v, table) of the Pallas kernel: k, v are our pool
    [num_pages, 1, 128, D] when hkv == 1, else already [Hkv, num_pages, 128, D]."""
    layout = (lambda x: x.reshape(1, x.shape[0], BLOCK, x.shape[-1])) if hkv == 1 else (lambda x: x)
    return lambda q, k, v, table: pallas_paged(q, layout(k), layout(v), table, kv.astype(jnp.int32))


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.copy_gbps = None
        self.failed = []

    def add(self, **row):
        row = {c: row.get(c) for c in COLUMNS} | row
        if row.get("ms") is not None and row.get("bytes") is not None:
            row["gbps"] = row["bytes"] / row["ms"] / 1e6
            if self.copy_gbps:
                row["of_copy"] = row["gbps"] / self.copy_gbps
        self.rows.append(row)
        _print(row)
        return row

    def run(self) -> list[dict]:
        a = self.args
        ms, nbytes = copy_ms(a.copy_gib, a.seed + 1, a.samples, a.min_sample_ms, a.warmup)
        self.copy_gbps = nbytes / ms / 1e6
        self.add(op="copy", B=0, T=0, ms=ms, bytes=nbytes, of_copy=1.0)
        for b in a.batch:
            for t in a.context:
                self.case(b, t)
        return self.rows

    def case(self, b, t):
        a = self.args
        hq, hkv = a.heads
        nq = a.queries
        if t < nq:
            print(f"skip: T={t} < Q={nq}")
            return
        pages = -(-t // BLOCK)
        base = dict(B=b, T=t, Q=nq, Hq=hq, Hkv=hkv)
        kv = jnp.full((b,), t, jnp.int32)
        key = jax.random.fold_in(jax.random.PRNGKey(a.seed), b * 1_000_003 + t)
        rng = np.random.default_rng([a.seed, b, t])
        dense_fp8_ms = None
        for cache in ("fp8", "bf16"):
            modes = [m for m in MODES if m in a.modes and m.endswith(cache)]  # dense before sparse
            pallas = cache == "bf16" and not a.skip_peers
            if not modes and not pallas:
                continue
            dtype = jnp.dtype(jnp.float8_e4m3fn if cache == "fp8" else jnp.bfloat16)
            page_bytes = hkv * BLOCK * DIM * dtype.itemsize  # one cache, one logical page, all kv heads
            set_bytes = 2 * b * pages * page_bytes  # K and V of one page set
            n_sets = _rotation(set_bytes, a.max_sets)
            if n_sets == 0:
                for mode in modes:
                    self.add(op=mode, **base, note=f"does not fit ({set_bytes / 2**30:.1f} GiB)")
                continue
            num_pages = n_sets * b * pages
            kk, kv_key, kq = jax.random.split(jax.random.fold_in(key, dtype.itemsize), 3)
            k_cache = random_values(kk, (num_pages, hkv, BLOCK, DIM), dtype)
            v_cache = random_values(kv_key, (num_pages, hkv, BLOCK, DIM), dtype)
            perm = rng.permutation(num_pages).astype(np.int32).reshape(n_sets, b, pages)
            tables = [jnp.asarray(perm[i]) for i in range(n_sets)]
            qs = [random_values(k, (b, nq, hq, DIM), jnp.bfloat16) for k in jax.random.split(kq, n_sets)]
            scales = FP8_SCALES if cache == "fp8" else {}
            fn = _paged_fn(a.implementation, scales, kv)
            for mode in modes:
                try:
                    if mode.startswith("dense"):
                        nbytes = 2 * b * pages * page_bytes
                        sets = [(qs[i], k_cache, v_cache, tables[i]) for i in range(n_sets)]
                        topk = None
                    else:
                        topk = a.topk
                        n_ids = max(n_sets, min(a.max_sets, -(-4 * L2_BYTES // max(1, 2 * b * topk * page_bytes))))
                        ids = [sparse_ids(rng, b, nq, hkv, topk, t, a.sparse_overlap == "independent")
                               for _ in range(n_ids)]
                        nbytes = round(np.mean([distinct_pages(x) for x in ids]) * 2 * BLOCK * DIM * dtype.itemsize)
                        sets = [(qs[i % n_sets], k_cache, v_cache, tables[i % n_sets], jnp.asarray(ids[i]))
                                for i in range(n_ids)]
                    ms = _time(fn, sets, a)
                    speedup = None
                    if mode == "dense-fp8":
                        dense_fp8_ms = ms
                    elif mode.startswith("sparse") and dense_fp8_ms is not None:
                        speedup = dense_fp8_ms / ms
                    self.add(op=mode, **base, topk=topk, sets=len(sets), ms=ms, bytes=nbytes, speedup=speedup)
                except Exception as e:  # noqa: BLE001  (keep the rest of the grid; reported and counted)
                    self.failed.append((mode, b, t))
                    self.add(op=mode, **base, note=_why(e))
                finally:
                    sets = None
            if pallas:
                self.pallas(base, k_cache, v_cache, perm, qs, kv, n_sets)
            _free(k_cache, v_cache, tables, qs)
            del k_cache, v_cache, tables, qs
        if not a.skip_peers:
            self.cudnn(base, key)

    def pallas(self, base, k_cache, v_cache, perm, qs, kv, n_sets):
        """JAX's Pallas (Triton) paged_attention on the bf16 pool: one query
        (the last) per request; its layout is [Hkv, num_pages, 128, D]."""
        b, t, hkv = base["B"], base["T"], base["Hkv"]
        nbytes = 2 * b * hkv * (-(-t // BLOCK)) * BLOCK * DIM * 2
        row = dict(base, op="pallas", Q=1, sets=n_sets, bytes=nbytes)
        try:
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as pallas_paged

            if hkv == 1:  # [N, 1, 128, D] -> [1, N, 128, D]: a free reshape inside the jitted call
                pages_kv = (k_cache, v_cache)
            else:  # transposed copies, made before timing
                if not _fits(2 * k_cache.nbytes):
                    self.add(**row, note="n/a: transposed pool does not fit")
                    return
                pages_kv = tuple(jax.jit(lambda x: jnp.swapaxes(x, 0, 1))(x) for x in (k_cache, v_cache))
            fn = _pallas_fn(pallas_paged, hkv, kv)
            # The Pallas kernel does not scale the logits: its q is pre-scaled by D**-0.5.
            sets = [((qs[i][:, -1] * DIM**-0.5).astype(jnp.bfloat16), *pages_kv, jnp.asarray(_pallas_table(perm[i])))
                    for i in range(n_sets)]
            try:
                self.add(**row, ms=_time(fn, sets, self.args))
            finally:
                if hkv != 1:
                    _free(pages_kv)
                sets = None
        except Exception as e:  # noqa: BLE001
            self.add(**row, note="n/a: " + _why(e))

    def cudnn(self, base, key):
        """jax.nn.dot_product_attention(implementation="cudnn") on the contiguous
        bf16 equivalent of dense-bf16: q [B, Q, Hq, D], k, v [B, T, Hkv, D]."""
        b, t, nq, hq, hkv = (base[c] for c in ("B", "T", "Q", "Hq", "Hkv"))
        set_bytes = 2 * b * t * hkv * DIM * 2
        row = dict(base, op="cudnn", bytes=set_bytes)
        n_sets = _rotation(set_bytes, self.args.max_sets)
        if n_sets == 0:
            self.add(**row, note=f"n/a: does not fit ({set_bytes / 2**30:.1f} GiB)")
            return
        sets = None
        try:
            keys = jax.random.split(jax.random.fold_in(key, 7), 3 * n_sets)
            sets = [(random_values(keys[3 * i], (b, nq, hq, DIM), jnp.bfloat16),
                     random_values(keys[3 * i + 1], (b, t, hkv, DIM), jnp.bfloat16),
                     random_values(keys[3 * i + 2], (b, t, hkv, DIM), jnp.bfloat16)) for i in range(n_sets)]
            fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            self.add(**row, sets=n_sets, ms=_time(fn, sets, self.args))
        except Exception as e:  # noqa: BLE001
            self.add(**row, note="n/a: " + _why(e))
        finally:
            _free(sets)


def _why(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}"


def _print(row):
    if row["op"] == "copy":
        print(f"{'copy':>11} {fmt(row['ms'], '9.4f')} ms {row['gbps']:9.1f} GB/s ({row['bytes'] / 2**30:.2f} GiB r+w)",
              flush=True)
        return
    text = (f"{row['op']:>11} B={row['B']:>4} T={row['T']:>7} Q={row['Q']:>2} "
            f"{fmt(row['ms'], '9.4f') + ' ms' if row['ms'] is not None else '      n/a   '} "
            f"{fmt(row['gbps'], '9.1f')} GB/s  of_copy={fmt(row['of_copy'], '.3f')}")
    if row.get("speedup") is not None:
        text += f"  speedup={row['speedup']:.2f}x"
    if row.get("note"):
        text += f"  [{row['note']}]"
    print(text, flush=True)


def _heads(text: str) -> tuple[int, int]:
    try:
        hq, hkv = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--heads {text!r}: expected HQ:HKV, e.g. 16:1") from None
    if hkv < 1 or hq % hkv:
        raise argparse.ArgumentTypeError(f"--heads {text!r}: HQ must be a multiple of HKV")
    return hq, hkv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--context", type=int, nargs="+", default=[4096, 10240, 51200, 102400, 204800],
                        help="kv_length of every request (T)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    parser.add_argument("--queries", type=int, default=8, help="new tokens per request (Q)")
    parser.add_argument("--heads", type=_heads, default=(16, 1), help="HQ:HKV (default 16:1)")
    parser.add_argument("--topk", type=int, default=16, help="logical pages per query in sparse modes")
    parser.add_argument("--sparse-overlap", choices=("shared", "independent"), default="shared", nargs="?",
                        const="independent",
                        help="sparse ids: the Q queries of a request share their earlier pages (shared, the "
                             "default), or draw them per query (independent; the bare flag means this)")
    parser.add_argument("--layers", type=int, default=8,
                        help="ops per jitted call (a decode step's layers); times are per op (see _time)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-sample-ms", type=float, default=5.0)
    parser.add_argument("--max-sets", type=int, default=16, help="most rotated input sets")
    parser.add_argument("--copy-gib", type=float, default=None,
                        help="size of the copied buffer (default 2 on a GPU, 0.25 elsewhere)")
    parser.add_argument("--implementation", choices=("auto", "kernel", "reference"), default="kernel")
    parser.add_argument("--skip-peers", action="store_true", help="time neither cudnn nor Pallas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--tsv", help="write the rows here")
    args = parser.parse_args(argv)
    if args.copy_gib is None:
        args.copy_gib = 2.0 if jax.default_backend() == "gpu" else 0.25
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if not 1 <= args.topk <= 64:
        parser.error(f"--topk must be in 1..64, got {args.topk}")
    meta = dict(announce_device(), queries=args.queries, heads=list(args.heads), dim=DIM, topk=args.topk,
                layers=args.layers, sparse_overlap=args.sparse_overlap, implementation=args.implementation)
    bench = Bench(args)
    rows = bench.run()
    meta["copy_gbps"] = bench.copy_gbps
    write_results(args.json, args.tsv, meta, rows, COLUMNS)
    if bench.failed:
        print(f"FAILED: {len(bench.failed)} paged_attention case(s): {bench.failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
