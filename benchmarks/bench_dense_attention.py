"""Benchmark of dense attention (spec §3.6), forward and backward, on one device.

For each sequence length S (self-attention, Sq = Sk = S, batch B = --tokens / S,
so that every row of the grid holds the same number of tokens), each head
configuration Hq:Hkv and causal / non-causal, with D = 128 and bf16, it times,
for each --pass,
  fwd   the forward (out only);
  bwd   the backward alone: the pullback of jax.vjp (the forward and its
        residuals computed beforehand, untimed) applied to a random dout;
  both  forward + backward in one jit (jax.grad-style: vjp then pullback);
of

  msa_fwd    jax_msa.dot_product_attention(q, k, v, causal=...)  (jit; the SM90
             kernel where the build has it, --implementation)
  cudnn_fwd  jax.nn.dot_product_attention(q, k, v, is_causal=..., implementation="cudnn")
             (GQA as is: k, v with Hkv heads; should cuDNN refuse, k and v are
             repeated to Hq heads and the row's note says so; skip: --no-cudnn)
  mgpu_fwd   jax.experimental.pallas.ops.gpu.attention_mgpu.attention, the
             Mosaic-GPU FA3-style kernel, block_q 64 and the fastest block_kv of
             --mgpu-block-kv (its note names it); a failure is recorded as the
             row's error (skip: --no-mgpu)

Method (spec §7, benchmarks/timing.py): random normal inputs, --rotate input
sets cycled; compile and --warmup calls excluded; each sample repeats the op
until it lasts >= --min-sample-ms, then block_until_ready; median of --samples.
cuDNN's and this op's samples are taken in turn (interleaved), so that a drift
of the card's clocks during a row does not move their ratio.
FLOPs: forward F = 4 * D * Hq * B * S^2 (2 matmuls: Q K^T, P V), half of it
when causal; backward 2.5 F (5 matmuls, as the FlashAttention papers count:
S = Q K^T recomputed, dP = dO V^T, dV = P^T dO, dK = dS^T Q, dQ = dS K);
both 3.5 F. The same count for every implementation, so the ratio is what
matters. cudnn_ratio = cuDNN ms / this op's ms (> 1: faster than cuDNN). The
Mosaic-GPU kernel is timed for the forward only.

  python3 benchmarks/bench_dense_attention.py --json dense.json --tsv dense.tsv
  python3 benchmarks/bench_dense_attention.py --pass bwd --seq 8192 16384 32768 --no-mgpu

JSON and TSV are rewritten after every (S, Hq:Hkv, causal).
"""

from __future__ import annotations

import argparse
import os
import sys

# FLOPs of each pass in units of the forward's (see the top).
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "both": 3.5}
TSV_COLUMNS = ("op", "S", "B", "Hq", "Hkv", "D", "causal", "ms", "tflops", "cudnn_ratio", "note", "error")


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


class Bench:
    """Runs the grid; collects rows; rewrites JSON/TSV after every shape."""

    def __init__(self, args):
        from jax_msa import _ffi
        from timing import announce_device

        self.args = args
        self.rows: list[dict] = []
        self.meta = dict(announce_device(), dtype=args.dtype, dim=args.dim, tokens=args.tokens,
                         implementation=args.implementation,
                         dense_kernel=_ffi.has_kernel("jax_msa_dot_product_attention_fwd", "cuda"),
                         dense_bwd_kernel=_ffi.has_kernel("jax_msa_dot_product_attention_bwd_cuda", "cuda"),
                         passes=args.passes,
                         samples=args.samples, warmup=args.warmup, min_sample_ms=args.min_sample_ms,
                         rotate=args.rotate, seed=args.seed)
        print(f"dense kernels in this build: forward {self.meta['dense_kernel']}, "
              f"backward {self.meta['dense_bwd_kernel']}", flush=True)

    def _time(self, cases):
        """(median ms per case, error per case) of the (fn, input sets) cases
        (None: not timed), their samples interleaved (timing.py)."""
        from timing import interleaved_median_ms

        live = [c for c in cases if c is not None]
        try:
            times = iter(interleaved_median_ms(live, self.args.samples, self.args.min_sample_ms,
                                               self.args.warmup) if live else [])
            return [next(times) if c is not None else None for c in cases], [None] * len(cases)
        except Exception as e:  # OOM, ...: record it and go on with the grid
            return [None] * len(cases), [_error(e) if c is not None else None for c in cases]

    def _row(self, op, s, b, hq, hkv, causal, ms, flop, cudnn_ms, note=None, error=None):
        row = dict(op=op, S=s, B=b, Hq=hq, Hkv=hkv, D=self.args.dim, causal=causal, ms=ms,
                   tflops=flop / ms / 1e9 if ms else None,
                   cudnn_ratio=cudnn_ms / ms if (cudnn_ms and ms) else None, note=note, error=error)
        self.rows.append(row)
        print(format_row(row), flush=True)

    def _case(self, attention, sets, mode):
        """((fn, input sets), None) timing `attention(q, k, v) -> out` in pass
        `mode` (see the top), compiled by one call; or (None, the error)."""
        import jax
        from timing import normal

        try:
            if mode == "fwd":
                fn, calls = jax.jit(attention), sets
            else:
                keys = jax.random.split(jax.random.PRNGKey(self.args.seed + 1), len(sets))
                couts = [normal(key, q.shape, q.dtype) for key, (q, _, _) in zip(keys, sets)]
                if mode == "both":
                    fn = jax.jit(lambda q, k, v, dout: jax.vjp(attention, q, k, v)[1](dout))
                    calls = [(*x, dout) for x, dout in zip(sets, couts)]
                else:
                    fwd = jax.jit(lambda q, k, v: jax.vjp(attention, q, k, v))
                    calls = [(fwd(*x)[1], dout) for x, dout in zip(sets, couts)]
                    fn = jax.jit(lambda pullback, dout: pullback(dout))
            jax.block_until_ready(fn(*calls[0]))  # a refused shape fails here, untimed
            return (fn, calls), None
        except Exception as e:  # a refused shape when tracing, OOM, ...
            return None, _error(e)

    def _cudnn(self, sets, causal, hq, hkv, mode="fwd"):
        """(case, note, error) of cuDNN (see _case), with k/v repeated to Hq
        heads if it refuses GQA."""
        import jax
        import jax.numpy as jnp

        def plain(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

        case, err = self._case(plain, sets, mode)
        if case is not None or hq == hkv:
            return case, None, err

        def repeated(q, k, v):
            return plain(q, jnp.repeat(k, hq // hkv, axis=2), jnp.repeat(v, hq // hkv, axis=2))

        case, err2 = self._case(repeated, sets, mode)
        return case, f"k, v repeated to {hq} heads (GQA refused: {err})", err2

    def _mgpu(self, sets, causal):
        """(ms, note, error) of the Mosaic-GPU kernel at its fastest block_kv, on
        float16 copies of the inputs where they are bfloat16 (this jax's kernel
        only takes float16: "src had type bfloat16 and dst had type float16")."""
        import jax
        import jax.numpy as jnp

        half = any(x.dtype == jnp.bfloat16 for s in sets for x in s)
        if half:
            sets = [tuple(x.astype(jnp.float16) for x in s) for s in sets]

        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu
        except Exception as e:  # not in this jax, or no Mosaic GPU
            return None, None, f"import attention_mgpu: {_error(e)}"
        best, errors = None, []
        for block_kv in self.args.mgpu_block_kv:
            try:
                config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2,
                                                     causal=causal)
            except Exception as e:
                errors.append(f"block_kv={block_kv}: {_error(e)}")
                continue
            case, err = self._case(lambda q, k, v, c=config: attention_mgpu.attention(q, k, v, c), sets, "fwd")
            (ms,), (err_t,) = self._time([case])
            err = err or err_t
            if ms is None:
                errors.append(f"block_kv={block_kv}: {err}")
            elif best is None or ms < best[0]:
                best = (ms, block_kv)
        if best is None:
            return None, None, "; ".join(errors)[:600]
        return best[0], f"block_q=64 block_kv={best[1]}" + (", float16 inputs" if half else ""), None

    def run(self):
        import jax
        import jax.numpy as jnp
        import jax_msa
        from timing import normal, write_results

        a = self.args
        dtype = jnp.dtype(a.dtype)
        for s in a.seq:
            b = max(1, a.tokens // s)
            for hq, hkv in a.heads:
                keys = jax.random.split(jax.random.PRNGKey(a.seed), 3 * a.rotate)
                sets = [tuple(normal(keys[3 * i + j], shape, dtype) for j, shape in
                              enumerate(((b, s, hq, a.dim), (b, s, hkv, a.dim), (b, s, hkv, a.dim))))
                        for i in range(a.rotate)]
                for causal in a.causal:
                    flop_fwd = 4 * a.dim * hq * b * s * s * (0.5 if causal else 1.0)
                    for mode in a.passes:
                        flop = flop_fwd * FLOP_FACTOR[mode]
                        cudnn, note, cudnn_err = (None, None, None) if a.no_cudnn else self._cudnn(
                            sets, causal, hq, hkv, mode)
                        ours, err = self._case(lambda q, k, v, c=causal: jax_msa.dot_product_attention(
                            q, k, v, causal=c, implementation=a.implementation), sets, mode)
                        (cudnn_ms, ms), (cudnn_err_t, err_t) = self._time([cudnn, ours])
                        del cudnn, ours  # their inputs (the pullbacks' residuals)
                        if not a.no_cudnn:
                            self._row(f"cudnn_{mode}", s, b, hq, hkv, causal, cudnn_ms, flop, cudnn_ms, note,
                                      cudnn_err or cudnn_err_t)
                        self._row(f"msa_{mode}", s, b, hq, hkv, causal, ms, flop, cudnn_ms, None, err or err_t)
                        if mode == "fwd" and not a.no_mgpu:
                            ms, note, err = self._mgpu(sets, causal)
                            self._row("mgpu_fwd", s, b, hq, hkv, causal, ms, flop, cudnn_ms, note, err)
                        write_results(a.json, a.tsv, self.meta, self.rows, TSV_COLUMNS)
                del sets


def format_row(row: dict) -> str:
    from timing import fmt

    text = (f"{row['op']:>10} S={row['S']:>6} B={row['B']:>3} H={row['Hq']}:{row['Hkv']:<2} "
            f"{'causal' if row['causal'] else 'full  '} {fmt(row['ms'], '9.3f')} ms "
            f"{fmt(row['tflops'], '6.1f')} TFLOP/s cudnn/this={fmt(row['cudnn_ratio'], '.2f')}")
    if row.get("note"):
        text += f"  ({row['note']})"
    if row.get("error"):
        text += f"  ERROR {row['error']}"
    return text


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py
    from bench_sparse_attention import parse_heads

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="B * S for every S (B = tokens // S)")
    parser.add_argument("--heads", type=parse_heads, nargs="+", default=[(16, 16), (16, 1), (64, 4)],
                        help="HQ:HKV pairs")
    parser.add_argument("--causal", type=lambda x: x.lower() in ("1", "true", "yes", "causal"), nargs="+",
                        default=[True, False], help="causal settings to time (true / false)")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=tuple(FLOP_FACTOR), default=["fwd"],
                        help="what to time: forward, backward alone, or both in one jit")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--implementation", choices=("kernel", "auto"), default="kernel",
                        help="passed to jax_msa.dot_product_attention")
    parser.add_argument("--mgpu-block-kv", type=int, nargs="+", default=[128, 256, 64])
    parser.add_argument("--no-cudnn", action="store_true")
    parser.add_argument("--no-mgpu", action="store_true")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-sample-ms", type=float, default=5.0)
    parser.add_argument("--rotate", type=int, default=2, help="input sets cycled through")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write meta and rows here")
    parser.add_argument("--tsv", help="write the rows here")
    args = parser.parse_args(argv)
    if args.rotate < 1 or args.samples < 1:
        parser.error("--rotate and --samples must be >= 1")
    Bench(args).run()


if __name__ == "__main__":
    main()
