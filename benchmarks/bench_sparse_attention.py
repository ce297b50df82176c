"""Benchmark of block-sparse MSA attention (spec §3.4), forward and backward, on one device.

For each sequence length T (B = 1, causal self-attention, Sq = Sk = T), each
head configuration Hq:Hkv and each selection pattern, with D = 128, bf16 and
top-16 blocks of 128 keys, it times

  sparse_fwd       jax_msa.sparse_attention(q, k, v, ids)          (jit)
  sparse_fwd_query, sparse_fwd_block
                   the same with schedule="query" / "block" (--schedules)
  sparse_fwd_bwd   forward + backward: jax.vjp, then the pullback of a random
                   cotangent, returning dq, dk, dv                    (jit)
  sparse_bwd       sparse_fwd_bwd - sparse_fwd (derived, not timed alone)
  sparse_fwd_bwd_det, sparse_bwd_det
                   the same with deterministic=True (--deterministic-backward)
  reference_fwd    the same op with implementation="reference" (pure JAX),
                   only for T <= --reference-max

and, once per (T, Hq:Hkv), dense causal attention on the same shapes:

  cudnn_fwd, cudnn_fwd_bwd, cudnn_bwd
                   jax.nn.dot_product_attention(q, k, v, is_causal=True,
                   implementation="cudnn"), the same way (skip: --no-cudnn)

The ids are computed before timing and are an input of the timed function.
Selection patterns (ids [1, T, Hkv, topk], one row of ids per KV group):

  window     query at position p takes its local block L = p // 128 and the
             topk - 1 blocks before it; for L + 1 <= topk the blocks 0..L,
             then -1. Neighbouring tokens share all their blocks.
  indexer    jax_msa.indexer(qi, ki, topk) on random normal qi [1, T, Hkv, 128],
             ki [1, T, 128]: the selection of an untrained indexer, close to
             uncorrelated between neighbouring tokens.
  clustered  jax_msa.indexer on smooth inputs, qi and ki alike: every feature
             is sqrt(1 - w) a_t + sqrt(w) n_t, with n_t white unit normal noise
             and a_t an independent stationary AR(1) random walk along the
             sequence, a_t = rho a_{t-1} + sqrt(1 - rho^2) e_t (unit normal
             e_t, a_0 = e_0), rho = exp(-1 / --corr-len), so that
             corr(x_t, x_{t+d}) = (1 - w) exp(-d / corr_len) for d > 0 and
             every feature has unit variance. Defaults: correlation length
             256 tokens (two blocks: nearby queries ask for similar blocks,
             nearby keys look alike, as a topic drifting through a document)
             and w = --clustered-noise = 0.25 (a token-specific share, so that
             neighbours agree on most but not all blocks). Measured at
             T = 8K, one index head: w = 0 gives a neighbour overlap of 96%
             and 17.4 blocks per 4-token tile (hardly different from window);
             w = 0.25 gives 72% and 24.5 (the random indexer: 48% and 33);
             at T = 32K, w = 0.25 gives 55% and 31.6 (random: 23% and 48).

Per pattern it also reports, from the ids of the first input set (valid entries only):
  keys_per_query  mean |S| (attended keys per query token)
  union4          mean number of distinct blocks over tiles of 4 consecutive
                  tokens (the blocks a query-outer tile of 4 tokens x the
                  group's heads must load)
  tile_eff        mean over tiles of (valid ids of the 4 tokens) / (4 union4):
                  the useful fraction of the blocks such a tile loads
  overlap         mean |ids(i) & ids(i+1)| / |ids(i+1)|: the share of a
                  token's blocks that the previous token also selected
  union4_full, overlap_full
                  the same over tokens with a full selection (L >= topk) only

Method (spec §7, benchmarks/timing.py): random normal inputs, --rotate input
sets (each with its own ids for the indexer patterns) cycled; compile and
--warmup calls excluded; each sample runs the op back to back until it lasts
>= --min-sample-ms and waits with block_until_ready; median of --samples.
Useful FLOPs: forward 4 * D * Hq/Hkv * sum over (query, group) of |S|, with
|S| = sum over valid ids c (0 <= c <= p // 128) of min(128, p - 128 c + 1),
counted exactly from the ids; backward 2.5x forward; fwd_bwd 3.5x forward.
cuDNN dense: 4 * D * Hq * T (T + 1) / 2 forward, 2.5x for backward.
cudnn_ratio = cuDNN ms / this op's ms for the matching pass (fwd, bwd, fwd_bwd).
With --energy, each timed op also gets joules (per call) and watts (mean):
NVML's energy counter over >= 3 s of back-to-back calls (timing.energy_per_call).
A card held at its power limit runs as fast as its energy per call allows.

  python3 benchmarks/bench_sparse_attention.py --json sparse.json --tsv sparse.tsv
  python3 benchmarks/bench_sparse_attention.py --plot sparse.json sparse.png   # needs matplotlib only

JSON and TSV are rewritten after every (T, Hq:Hkv), so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import numpy as np

BLOCK = 128
PATTERNS = ("window", "indexer", "clustered")
STAT_KEYS = ("keys_per_query", "union4", "tile_eff", "overlap", "union4_full", "overlap_full")
TSV_COLUMNS = ("op", "pattern", "T", "Hq", "Hkv", "D", "topk", "ms", "tflop", "tflops", "cudnn_ratio",
               "joules", "watts", *STAT_KEYS, "error")


# --------------------------------------------------------------------------- selection patterns

def window_ids(t: int, hkv: int, topk: int) -> np.ndarray:
    """ids [1, t, hkv, topk] int32 of the sliding-window pattern (local block last)."""
    local = np.arange(t, dtype=np.int64) // BLOCK
    slot = np.arange(topk, dtype=np.int64)
    window = local[:, None] - (topk - 1) + slot  # blocks L-topk+1 .. L, ascending
    early = np.where(slot[None, :] <= local[:, None], slot[None, :], -1)  # blocks 0..L, then -1
    ids = np.where((local + 1 > topk)[:, None], window, early).astype(np.int32)
    return np.ascontiguousarray(np.broadcast_to(ids[None, :, None, :], (1, t, hkv, topk)))


def ar1_walk(key, shape, corr_len: float, dtype):
    """Stationary AR(1) process along axis 1 of `shape`, unit variance, corr exp(-d/corr_len)."""
    import jax
    import jax.numpy as jnp

    rho = math.exp(-1.0 / corr_len)
    noise = jax.random.normal(key, tuple(shape), jnp.float32)
    t = shape[1]
    # x_0 = e_0 (already stationary); x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t.
    gain = jnp.full((1, t) + (1,) * (len(shape) - 2), rho, jnp.float32).at[:, 0].set(0.0)
    drive = noise * jnp.full((1, t) + (1,) * (len(shape) - 2), math.sqrt(1.0 - rho * rho),
                             jnp.float32).at[:, 0].set(1.0)

    def combine(first, second):  # compose x -> a1 x + b1, then x -> a2 x + b2
        a1, b1 = first
        a2, b2 = second
        return a1 * a2, a2 * b1 + b2

    _, x = jax.lax.associative_scan(combine, (gain, drive), axis=1)
    return x.astype(dtype)


def smooth_features(key, shape, corr_len: float, noise_share: float, dtype):
    """sqrt(1 - w) * AR(1) walk + sqrt(w) * white noise, unit variance (the clustered pattern's inputs)."""
    import jax
    import jax.numpy as jnp

    walk_key, noise_key = jax.random.split(key)
    x = math.sqrt(1.0 - noise_share) * ar1_walk(walk_key, shape, corr_len, jnp.float32)
    if noise_share > 0:
        x = x + math.sqrt(noise_share) * jax.random.normal(noise_key, tuple(shape), jnp.float32)
    return x.astype(dtype)


@functools.lru_cache(maxsize=None)
def _jitted(name: str, *static):
    """One jitted helper per (name, static arguments), so every input set reuses its compilation."""
    import jax

    import jax_msa

    if name == "smooth_features":
        shape, corr_len, noise_share, dtype = static
        return jax.jit(lambda key: smooth_features(key, shape, corr_len, noise_share, dtype))
    if name == "indexer":
        (topk,) = static
        return jax.jit(lambda qi, ki: jax_msa.indexer(qi, ki, topk=topk))
    raise KeyError(name)


def make_ids(pattern: str, key, t: int, hkv: int, args, dtype):
    """ids [1, t, hkv, topk] int32 on the device for one input set."""
    import jax
    import jax.numpy as jnp

    if pattern == "window":
        return jnp.asarray(window_ids(t, hkv, args.topk))
    kq, kk = jax.random.split(key)
    if pattern == "indexer":
        qi = jax.random.normal(kq, (1, t, hkv, args.dim), jnp.float32).astype(dtype)
        ki = jax.random.normal(kk, (1, t, args.dim), jnp.float32).astype(dtype)
    elif pattern == "clustered":
        qi = _jitted("smooth_features", (1, t, hkv, args.dim), args.corr_len, args.clustered_noise, dtype)(kq)
        ki = _jitted("smooth_features", (1, t, args.dim), args.corr_len, args.clustered_noise, dtype)(kk)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    ids = _jitted("indexer", args.topk)(qi, ki)
    del qi, ki
    return jax.block_until_ready(ids)


# --------------------------------------------------------------------------- statistics of a selection

def _valid(ids: np.ndarray) -> np.ndarray:
    """ids [T, G, K] with every entry outside 0 <= c <= p // 128 replaced by -1 (int64)."""
    ids = ids.astype(np.int64)
    local = (np.arange(ids.shape[0], dtype=np.int64) // BLOCK)[:, None, None]
    return np.where((ids >= 0) & (ids <= local), ids, -1)


def attended_keys(ids: np.ndarray) -> np.ndarray:
    """|S| per (query, group) [T, G] from ids [T, G, K] (Sq = Sk = T, no padding)."""
    ids = _valid(ids)
    pos = np.arange(ids.shape[0], dtype=np.int64)[:, None, None]
    keys = np.minimum(BLOCK, pos - BLOCK * ids + 1)
    return np.where(ids >= 0, keys, 0).sum(axis=-1)


def _distinct(rows: np.ndarray) -> np.ndarray:
    """Number of distinct non-negative entries along the last axis."""
    s = np.sort(rows, axis=-1)
    new = np.ones_like(s, dtype=bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    return (new & (s >= 0)).sum(axis=-1)


def selection_stats(ids: np.ndarray, topk: int) -> dict:
    """Pattern statistics (see the module docstring) of ids [T, G, K]."""
    ids = _valid(ids)
    t, g, k = ids.shape
    count = (ids >= 0).sum(axis=-1)  # [T, G]
    full = (np.arange(t) // BLOCK) >= topk  # tokens whose selection is full (L >= topk)
    stats = dict(keys_per_query=float(attended_keys(ids).mean()))
    # Tiles of 4 consecutive tokens (a trailing partial tile is dropped).
    n4 = t // 4
    if n4:
        tiles = ids[: 4 * n4].reshape(n4, 4, g, k).transpose(0, 2, 1, 3).reshape(n4, g, 4 * k)
        union = _distinct(tiles)  # [n4, G]
        picked = count[: 4 * n4].reshape(n4, 4, g).sum(axis=1)
        stats["union4"] = float(union.mean())
        stats["tile_eff"] = float((picked / (4.0 * union)).mean())
        tile_full = full[: 4 * n4].reshape(n4, 4).all(axis=1)
        stats["union4_full"] = float(union[tile_full].mean()) if tile_full.any() else None
    else:
        stats.update(union4=None, tile_eff=None, union4_full=None)
    # Neighbour overlap: entries of token i+1 also picked by token i.
    if t > 1:
        pairs = np.sort(np.concatenate([ids[:-1], ids[1:]], axis=-1), axis=-1)
        # A block picked by both tokens appears twice (ids within one row are distinct).
        shared = ((pairs[..., 1:] == pairs[..., :-1]) & (pairs[..., 1:] >= 0)).sum(axis=-1)
        frac = shared / count[1:]
        stats["overlap"] = float(frac.mean())
        pair_full = full[1:] & full[:-1]
        stats["overlap_full"] = float(frac[pair_full].mean()) if pair_full.any() else None
    else:
        stats.update(overlap=None, overlap_full=None)
    return stats


# --------------------------------------------------------------------------- the run

def parse_heads(text: str) -> tuple[int, int]:
    try:
        hq, hkv = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"heads must look like HQ:HKV (e.g. 16:1), got {text!r}")
    if hq < 1 or hkv < 1 or hq % hkv:
        raise argparse.ArgumentTypeError(f"heads {text!r}: need HQ a positive multiple of HKV")
    return hq, hkv


class Bench:
    """Runs the grid; collects rows; rewrites JSON/TSV after every shape."""

    def __init__(self, args):
        import jax

        self.args = args
        self.rows: list[dict] = []
        self.read_joules = None
        if args.energy:
            from timing import nvml_energy_reader

            self.read_joules = nvml_energy_reader()
            if self.read_joules is None:
                print("# --energy: NVML's energy counter is not available here; no energy measured", flush=True)
        device = jax.devices()[0]
        platform = {"gpu": "cuda"}.get(device.platform, device.platform)
        try:
            from jax_msa import _ffi
            kernels = {op: _ffi.has_kernel(f"jax_msa_sparse_attention_{op}", platform)
                       for op in ("fwd_query", "fwd_by_block", "bwd_cuda")}
        except Exception:  # an older/newer build without the helper: record nothing
            kernels = None
        import jax_msa
        self.meta = dict(
            device=device.device_kind, platform=device.platform, jax=jax.__version__,
            jax_msa=getattr(jax_msa, "__version__", None), argv=sys.argv, dtype=args.dtype, topk=args.topk,
            dim=args.dim, implementation=args.implementation, sparse_kernels=kernels, corr_len=args.corr_len,
            clustered_noise=args.clustered_noise,
            samples=args.samples, warmup=args.warmup, min_sample_ms=args.min_sample_ms, rotate=args.rotate,
            energy=args.energy,
            seed=args.seed, date=None)

    # -- timing with errors recorded, not raised

    def _time(self, fn, sets):
        """(median ms, error message, (joules per call, watts) with --energy else None)."""
        from timing import energy_per_call, median_ms

        try:
            ms = median_ms(fn, sets, self.args.samples, self.args.min_sample_ms, self.args.warmup)
            energy = energy_per_call(fn, sets, self.read_joules, ms) if self.read_joules else None
            return ms, None, energy
        except Exception as e:  # OOM, missing kernel, ...: record it and go on with the grid
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            return None, msg, None

    def _row(self, op, pattern, t, hq, hkv, ms, flop, dense_ms=None, stats=None, error=None, energy=None):
        a = self.args
        row = dict(op=op, pattern=pattern, T=t, Hq=hq, Hkv=hkv, D=a.dim, topk=a.topk, ms=ms,
                   tflop=flop / 1e12 if flop is not None else None,
                   tflops=flop / ms / 1e9 if (flop is not None and ms) else None,
                   cudnn_ratio=dense_ms / ms if (dense_ms and ms) else None,
                   joules=energy[0] if energy else None, watts=energy[1] if energy else None, error=error)
        for key in STAT_KEYS:
            row[key] = (stats or {}).get(key)
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row

    def run(self):
        a = self.args
        for t in a.seq:
            for hq, hkv in a.heads:
                self.shape(t, hq, hkv)
                self.write()

    def shape(self, t: int, hq: int, hkv: int):
        """Everything at one (T, Hq:Hkv): cuDNN dense, then each pattern. Inputs die on return."""
        import jax
        import jax.numpy as jnp

        import jax_msa
        from timing import normal

        a = self.args
        dtype = jnp.dtype(a.dtype)
        base = jax.random.fold_in(jax.random.PRNGKey(a.seed), t * 10007 + hq * 101 + hkv)
        keys = jax.random.split(base, 4 * a.rotate)
        backward = not a.no_backward
        sets = []
        for i in range(a.rotate):
            q = normal(keys[4 * i], (1, t, hq, a.dim), dtype)
            k = normal(keys[4 * i + 1], (1, t, hkv, a.dim), dtype)
            v = normal(keys[4 * i + 2], (1, t, hkv, a.dim), dtype)
            cot = normal(keys[4 * i + 3], (1, t, hq, a.dim), dtype) if backward else None
            sets.append((q, k, v, cot))
        jax.block_until_ready(sets)

        dense = {}
        if not a.no_cudnn:
            dense_flop = 4.0 * a.dim * hq * t * (t + 1) / 2

            def cudnn(q, k, v):
                return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

            ms, err, energy = self._time(jax.jit(cudnn), [s[:3] for s in sets])
            dense["fwd"] = ms
            self._row("cudnn_fwd", "dense", t, hq, hkv, ms, dense_flop, ms, error=err, energy=energy)
            if backward:
                def cudnn_fwd_bwd(q, k, v, cot):
                    _, pull = jax.vjp(cudnn, q, k, v)
                    return pull(cot)

                ms, err, energy = self._time(jax.jit(cudnn_fwd_bwd), sets)
                dense["fwd_bwd"] = ms
                self._row("cudnn_fwd_bwd", "dense", t, hq, hkv, ms, 3.5 * dense_flop, ms, error=err,
                          energy=energy)
                bwd = ms - dense["fwd"] if (ms and dense["fwd"]) else None
                dense["bwd"] = bwd
                self._row("cudnn_bwd", "dense", t, hq, hkv, bwd, 2.5 * dense_flop, bwd,
                          error=None if bwd is not None else "not derived (a timing failed)")

        impl = a.implementation

        def sparse(q, k, v, ids, schedule="auto", deterministic=False):
            return jax_msa.sparse_attention(q, k, v, ids, implementation=impl, schedule=schedule,
                                            deterministic=deterministic)

        def sparse_fwd_bwd(q, k, v, ids, cot, deterministic=False):
            _, pull = jax.vjp(lambda q, k, v: sparse(q, k, v, ids, deterministic=deterministic), q, k, v)
            return pull(cot)

        def reference(q, k, v, ids):
            return jax_msa.sparse_attention(q, k, v, ids, implementation="reference")

        fwd_fn, fwd_bwd_fn, ref_fn = jax.jit(sparse), jax.jit(sparse_fwd_bwd), jax.jit(reference)
        for p_index, pattern in enumerate(a.patterns):
            pkeys = jax.random.split(jax.random.fold_in(base, 7919 + p_index), a.rotate)
            if pattern == "window":  # deterministic: one array serves every input set
                ids_sets = [make_ids(pattern, None, t, hkv, a, dtype)] * a.rotate
            else:
                ids_sets = [make_ids(pattern, pkeys[i], t, hkv, a, dtype) for i in range(a.rotate)]
            host = [np.asarray(x)[0] for x in ids_sets[: 1 if pattern == "window" else a.rotate]]
            stats = selection_stats(host[0], a.topk)
            # Useful forward FLOPs: the mean over the input sets that the timing cycles through.
            flop = float(np.mean([4.0 * a.dim * (hq // hkv) * attended_keys(h).sum() for h in host]))
            del host
            print(f"# pattern {pattern:>9} T={t} H={hq}:{hkv}  "
                  + "  ".join(f"{k}={_fmt(stats[k], '.3f')}" for k in STAT_KEYS), flush=True)

            fwd_sets = [(q, k, v, ids) for (q, k, v, _), ids in zip(sets, ids_sets)]
            fwd_ms, err, energy = self._time(fwd_fn, fwd_sets)
            self._row("sparse_fwd", pattern, t, hq, hkv, fwd_ms, flop, dense.get("fwd"), stats, err, energy)
            for schedule in a.schedules:  # the CUDA forward's two schedules, each alone
                ms, err, energy = self._time(jax.jit(lambda q, k, v, ids, s=schedule: sparse(q, k, v, ids, s)),
                                             fwd_sets)
                self._row(f"sparse_fwd_{schedule}", pattern, t, hq, hkv, ms, flop, dense.get("fwd"), stats, err,
                          energy)
            if backward:
                fb_sets = [(q, k, v, ids, cot) for (q, k, v, cot), ids in zip(sets, ids_sets)]
                variants = [("", fwd_bwd_fn)]
                if a.deterministic_backward:
                    variants.append(("_det", jax.jit(lambda *x: sparse_fwd_bwd(*x, deterministic=True))))
                for suffix, fn in variants:
                    fb_ms, err, energy = self._time(fn, fb_sets)
                    self._row(f"sparse_fwd_bwd{suffix}", pattern, t, hq, hkv, fb_ms, 3.5 * flop,
                              dense.get("fwd_bwd"), stats, err, energy)
                    bwd = fb_ms - fwd_ms if (fb_ms and fwd_ms) else None
                    self._row(f"sparse_bwd{suffix}", pattern, t, hq, hkv, bwd, 2.5 * flop, dense.get("bwd"), stats,
                              None if bwd is not None else "not derived (a timing failed)")
                del fb_sets
            if t <= a.reference_max:
                ms, err, energy = self._time(ref_fn, fwd_sets)
                self._row("reference_fwd", pattern, t, hq, hkv, ms, flop, dense.get("fwd"), stats, err, energy)
            del fwd_sets, ids_sets
        del sets

    # -- output

    def write(self):
        from timing import write_results
        write_results(self.args.json, self.args.tsv, self.meta, self.rows, TSV_COLUMNS)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_row(row: dict) -> str:
    text = (f"{row['op']:>15} {row['pattern']:>9} T={row['T']:>6} H={row['Hq']}:{row['Hkv']:<2} "
            f"{_fmt(row['ms'], '10.3f')} ms {_fmt(row['tflops'], '7.1f' if (row['tflops'] or 0) >= 10 else '7.3f')} TFLOP/s "
            f"cudnn/this={_fmt(row['cudnn_ratio'], '.2f')}")
    if row.get("joules") is not None:
        text += f" {row['joules']:.3f} J/call {row['watts']:.0f} W"
    if row.get("error"):
        text += f"  ERROR {row['error']}"
    return text


# --------------------------------------------------------------------------- plot (matplotlib only)

def plot(json_paths: list[str], png_path: str):
    """Draw the rows of one or more results JSONs (e.g. a grid run in parts) into a PNG.

    One column per Hq:Hkv; the title takes its meta from the first file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = None, []
    for path in json_paths:
        with open(path) as f:
            data = json.load(f)
        meta = meta or data.get("meta", {})
        rows += [r for r in data["rows"] if r.get("ms") is not None and r["ms"] > 0]
    if not rows:
        raise SystemExit(f"{', '.join(json_paths)}: no timed rows to plot")
    heads = list(dict.fromkeys((r["Hq"], r["Hkv"]) for r in rows))  # in the order of the run
    patterns = [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]
    patterns += sorted({r["pattern"] for r in rows} - set(patterns) - {"dense"})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {p: palette[i % len(palette)] for i, p in enumerate(patterns)}
    color["dense"] = "black"

    def series(op, pattern, hq, hkv, field="ms"):
        pts = sorted((r["T"], r[field]) for r in rows
                     if r["op"] == op and r["pattern"] == pattern and (r["Hq"], r["Hkv"]) == (hq, hkv)
                     and r.get(field) is not None)
        return [x for x, _ in pts], [y for _, y in pts]

    def line(ax, xy, fmt, **kw):  # draw (and list in the legend) only series that have points
        if xy[0]:
            ax.plot(*xy, fmt, **kw)

    panels = [("forward time (ms)", "ms"), ("forward + backward time (ms)", "ms"),
              ("useful TFLOP/s (solid fwd, dashed bwd)", "tflops"),
              ("cuDNN ms / op ms (solid fwd, dashed fwd+bwd)", "cudnn_ratio")]
    fig, axes = plt.subplots(len(panels), len(heads), figsize=(max(9.0, 5.2 * len(heads)), 3.4 * len(panels)),
                             squeeze=False, sharex=True)
    for col, (hq, hkv) in enumerate(heads):
        ax = axes[0][col]
        for p in patterns:
            line(ax, series("sparse_fwd", p, hq, hkv), "o-", color=color[p], label=f"sparse {p}")
            line(ax, series("reference_fwd", p, hq, hkv), "x:", color=color[p], alpha=0.6,
                 label=f"pure-JAX ref. {p}")
        line(ax, series("cudnn_fwd", "dense", hq, hkv), "s-", color="black", label="cuDNN dense")
        ax = axes[1][col]
        for p in patterns:
            line(ax, series("sparse_fwd_bwd", p, hq, hkv), "o-", color=color[p], label=f"sparse {p}")
        line(ax, series("cudnn_fwd_bwd", "dense", hq, hkv), "s-", color="black", label="cuDNN dense")
        ax = axes[2][col]
        for p in patterns + ["dense"]:
            op = "cudnn" if p == "dense" else "sparse"
            line(ax, series(f"{op}_fwd", p, hq, hkv, "tflops"), "o-", color=color[p],
                 label="cuDNN dense" if p == "dense" else f"sparse {p}")
            line(ax, series(f"{op}_bwd", p, hq, hkv, "tflops"), "o--", color=color[p])
        ax = axes[3][col]
        for p in patterns:
            line(ax, series("sparse_fwd", p, hq, hkv, "cudnn_ratio"), "o-", color=color[p], label=f"sparse {p}")
            line(ax, series("sparse_fwd_bwd", p, hq, hkv, "cudnn_ratio"), "o--", color=color[p])
        ax.axhline(1.0, color="gray", lw=0.8)
        axes[0][col].set_title(f"Hq:Hkv = {hq}:{hkv}")
        for row_index, (label, _) in enumerate(panels):
            ax = axes[row_index][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log" if row_index != 2 else "linear")
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel(label)
        ts = sorted({r["T"] for r in rows})
        axes[-1][col].set_xticks(ts)
        axes[-1][col].set_xticklabels([f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in ts])
        axes[-1][col].set_xlabel("sequence length T (B = 1, causal)")
    for ax in axes[:, 0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"jax_msa.sparse_attention (implementation={meta.get('implementation')}), "
                 f"top-{meta.get('topk')} blocks of 128, D = {meta.get('dim')}, {meta.get('dtype')}, B = 1\n"
                 f"{meta.get('device')}, jax {meta.get('jax')}, {meta.get('date')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}")


# --------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072], help="sequence lengths T")
    parser.add_argument("--heads", type=parse_heads, nargs="+", default=[(16, 1), (64, 4)],
                        help="head configurations HQ:HKV (default 16:1 64:4)")
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128, help="head dim D (and index dim Di)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after the compiling one")
    parser.add_argument("--min-sample-ms", type=float, default=5.0, help="repeat the op until a sample lasts this")
    parser.add_argument("--rotate", type=int, default=2, help="input sets cycled through")
    parser.add_argument("--reference-max", type=int, default=32768, help="largest T timed for the reference")
    parser.add_argument("--corr-len", type=float, default=256.0,
                        help="correlation length (tokens) of the clustered pattern's AR(1) inputs")
    parser.add_argument("--clustered-noise", type=float, default=0.25,
                        help="white-noise share w of the variance of the clustered pattern's inputs (0..1)")
    parser.add_argument("--implementation", choices=("kernel", "auto"), default="auto",
                        help="passed to jax_msa.sparse_attention")
    parser.add_argument("--schedules", nargs="*", default=["query", "block"], choices=("query", "block"),
                        help="also time the forward with each of these schedules (sparse_fwd_<schedule>)")
    parser.add_argument("--no-cudnn", action="store_true", help="skip the cuDNN dense baseline")
    parser.add_argument("--no-backward", action="store_true", help="time forward passes only")
    parser.add_argument("--deterministic-backward", action="store_true",
                        help="also time the backward with deterministic=True (sparse_fwd_bwd_det, sparse_bwd_det)")
    parser.add_argument("--energy", action="store_true",
                        help="also measure joules per call and mean watts of each timed op (NVML's energy "
                             "counter over >= 3 s of back-to-back calls; columns joules, watts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write meta and rows here")
    parser.add_argument("--tsv", help="write the rows here")
    parser.add_argument("--plot", nargs="+", metavar="FILE",
                        help="RESULTS_JSON [MORE_JSON ...] OUT_PNG: only draw OUT_PNG from JSON written earlier "
                             "(several files: a grid run in parts); needs matplotlib, not jax")
    args = parser.parse_args(argv)
    if args.plot:
        if len(args.plot) < 2:
            parser.error("--plot needs RESULTS_JSON [MORE_JSON ...] OUT_PNG")
        plot(args.plot[:-1], args.plot[-1])
        return
    if args.rotate < 1 or args.samples < 1:
        parser.error("--rotate and --samples must be >= 1")
    if not 0.0 <= args.clustered_noise <= 1.0 or args.corr_len <= 0:
        parser.error("--clustered-noise must lie in [0, 1] and --corr-len be > 0")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py

    bench = Bench(args)
    m = bench.meta
    print(f"device: {m['device']} ({m['platform']}), jax {m['jax']}, sparse kernels {m['sparse_kernels']}, "
          f"implementation={args.implementation}", flush=True)
    bench.run()
    bench.write()


if __name__ == "__main__":
    main()
