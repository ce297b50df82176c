"""Serving with MSA over a paged KV cache: prefill, then MTP-style decode.

Two requests with prompts of different lengths share one page pool, handed
out in shuffled order as a serving engine's allocator would. The prompts are
written into the paged K/V and index-key caches and prefilled in one chunk
(sparse). Then each step decodes `--mtp` tokens per request at once (a draft
checked in one pass, MTP-style) inside `jax.lax.scan`: their keys are written
to the caches, `paged_indexer` picks the top-16 pages of every new token, and
`paged_attention` attends to those pages (sparse) and to all pages (dense).
The printout shows how closely sparse follows dense: the relative difference
of the outputs and the share of the dense attention mass in the selected
pages, exp(lse_sparse - lse_dense).

The data is synthetic: every query looks for a few earlier tokens ("needles")
and the index projections are a random rotation of the keys, so the index
scores equal the head-mean attention logits (a stand-in for a trained indexer).

    python examples/decode.py [--steps 8] [--mtp 4] [--fp8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_msa

PAGE = jax_msa.BLOCK_SIZE
B, HQ, HKV, D, DI, TOPK = 2, 16, 1, 128, 128, 16  # one GPU's slice of the published model
PROMPTS = np.asarray([3000, 1900])
NEEDLES = 8


def write(cache, page_table, positions, values, valid):
    """Stores values [B, n, ...] at the logical positions [B, n] of a paged
    cache ([num_pages, Hkv, 128, D] or [num_pages, 128, Di]) where valid."""
    pages = jnp.take_along_axis(page_table, positions // PAGE, axis=1)
    pages = jnp.where(valid, pages, cache.shape[0])  # out of range: dropped
    index = (pages, slice(None), positions % PAGE) if cache.ndim == 4 else (pages, positions % PAGE)
    return cache.at[index].set(values.astype(cache.dtype), mode="drop")


def make_tokens(rng, total):
    """Keys, values, index keys of every token, and the queries of each:
    a query is the mean of the keys of NEEDLES random earlier tokens, scaled,
    plus noise (per head)."""
    k = rng.standard_normal((B, total, HKV, D), np.float32)
    v = rng.standard_normal((B, total, HKV, D), np.float32)
    rotation = np.linalg.qr(rng.standard_normal((D, DI)))[0].astype(np.float32)
    needles = (rng.random((B, total, NEEDLES)) * (np.arange(total)[None, :, None] + 1)).astype(np.int64)
    target = np.take_along_axis(k[:, :, 0], needles.reshape(B, -1)[..., None], axis=1)
    target = target.reshape(B, total, NEEDLES, D).mean(axis=2)
    q = 6.0 * target[:, :, None, :] + rng.standard_normal((B, total, HQ, D), np.float32)
    qi = q.reshape(B, total, HKV, HQ // HKV, D).mean(axis=3) @ rotation
    return k, v, k[:, :, 0] @ rotation, q, qi


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="decode steps")
    parser.add_argument("--mtp", type=int, default=4, help="tokens decoded per step and request")
    parser.add_argument("--fp8", action="store_true", help="float8_e4m3fn caches with per-tensor scales")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    total = PROMPTS + args.steps * args.mtp
    max_pages = int(-(-total.max() // PAGE))
    used = -(-total // PAGE)
    num_pages = int(used.sum()) + 8
    pool = rng.permutation(num_pages)
    page_table = np.full((B, max_pages), -1, np.int32)
    page_table[0, :used[0]], page_table[1, :used[1]] = pool[:used[0]], pool[used[0]:used[0] + used[1]]
    page_table = jnp.asarray(page_table)
    k, v, ki, q, qi = make_tokens(rng, int(total.max()))

    cache_dtype = jnp.float8_e4m3fn if args.fp8 else jnp.bfloat16
    # Per-tensor scales mapping the data to e4m3's range (448); 1 for bf16.
    scales = [float(np.abs(x).max() / 448) if args.fp8 else 1.0 for x in (k, v, ki)]
    caches = [jnp.zeros((num_pages, HKV, PAGE, D), cache_dtype), jnp.zeros((num_pages, HKV, PAGE, D), cache_dtype),
              jnp.zeros((num_pages, PAGE, DI), cache_dtype)]
    print(f"jax_msa paged decode: {B} requests, prompts {PROMPTS.tolist()}, {HQ} q heads / {HKV} kv head, d={D}, "
          f"top-{TOPK} pages, {jnp.dtype(cache_dtype).name} caches, {args.mtp} tokens per step, "
          f"{jax.devices()[0].platform} kernels")

    # Prefill: write the prompts into the caches, then attend in one chunk.
    n = int(PROMPTS.max())
    positions = jnp.broadcast_to(jnp.arange(n), (B, n))
    in_prompt = positions < jnp.asarray(PROMPTS)[:, None]
    caches = [write(c, page_table, positions, jnp.asarray(x[:, :n]) / s, in_prompt)
              for c, x, s in zip(caches, (k, v, ki), scales)]
    lengths = jnp.asarray(PROMPTS, jnp.int32)

    @jax.jit
    def prefill(caches, q, qi):
        ids = jax_msa.paged_indexer(qi, caches[2], page_table, lengths, topk=TOPK, ki_scale=scales[2],
                                    q_lengths=lengths)
        return jax_msa.paged_attention(q, caches[0], caches[1], page_table, lengths, ids, k_scale=scales[0],
                                       v_scale=scales[1], q_lengths=lengths)

    start = time.perf_counter()
    prefill(caches, jnp.asarray(q[:, :n], jnp.bfloat16), jnp.asarray(qi[:, :n], jnp.bfloat16)).block_until_ready()
    print(f"prefill, sparse, {int(PROMPTS.sum())} tokens in one chunk: {time.perf_counter() - start:.2f} s "
          "(compilation included)")

    # Decode: args.steps steps of args.mtp tokens per request in one lax.scan.
    def step(carry, xs):
        caches, kv = carry
        new_k, new_v, new_ki, q, qi = xs
        positions = kv[:, None] + jnp.arange(args.mtp)
        valid = jnp.ones(positions.shape, bool)
        caches = [write(c, page_table, positions, x / s, valid)
                  for c, x, s in zip(caches, (new_k, new_v, new_ki), scales)]
        kv = kv + args.mtp
        ids = jax_msa.paged_indexer(qi, caches[2], page_table, kv, topk=TOPK, ki_scale=scales[2])
        attend = lambda ids: jax_msa.paged_attention(q, caches[0], caches[1], page_table, kv, ids, k_scale=scales[0],
                                                     v_scale=scales[1], return_lse=True, out_dtype=jnp.float32)
        (sparse, sparse_lse), (dense, dense_lse) = attend(ids), attend(None)
        rel_diff = jnp.linalg.norm(sparse - dense) / jnp.linalg.norm(dense)
        mass = jnp.mean(jnp.exp(sparse_lse - dense_lse))
        return (caches, kv), (kv, rel_diff, mass)

    def steps_of(x):  # [B, T, ...] -> [steps, B, mtp, ...] of the decoded tokens
        x = jnp.asarray(x)
        per_row = [jax.lax.dynamic_slice_in_dim(x[b], int(PROMPTS[b]), args.steps * args.mtp) for b in range(B)]
        x = jnp.stack(per_row).reshape(B, args.steps, args.mtp, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    xs = tuple(steps_of(x) for x in (k, v, ki, q.astype(jnp.bfloat16), qi.astype(jnp.bfloat16)))
    decode = jax.jit(lambda carry, xs: jax.lax.scan(step, carry, xs))
    start = time.perf_counter()
    _, (contexts, rel_diffs, masses) = jax.block_until_ready(decode((caches, lengths), xs))
    elapsed = time.perf_counter() - start

    print("step  context        sparse vs dense: rel. diff   attention mass kept")
    for t in range(args.steps):
        print(f"{t + 1:4d}  {str(np.asarray(contexts[t]).tolist()):13s}  {float(rel_diffs[t]):25.4f}"
              f"   {float(masses[t]):19.4f}")
    print(f"decode, {args.steps} steps x {args.mtp} tokens x {B} requests in lax.scan: {elapsed:.2f} s "
          "(compilation included)")


if __name__ == "__main__":
    main()
