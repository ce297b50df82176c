"""Train a small MSA transformer LM on long-range key-value retrieval, on a mesh.

    python examples/train_flax.py        # 2 x 2 emulated CPU devices, ~2 minutes on 2 cores
    python examples/train_flax.py --data 1 --context 4 --seq-len 16384 --batch 4 \\
        --embed 512 --heads 8 --kv-heads 2 --head-dim 64 --index-head-dim 64 --topk 8 \\
        --facts 32 --steps 1000 --dtype bfloat16                      # 4 GPUs

The task: a sequence of filler tokens with `--facts` "fact" tokens scattered
over it, each binding a key to a value, then queries at the end: a query token
names a key and the next token must be its value. The answer is one fact
somewhere in the past, so sparse attention only succeeds if the indexer picks
the fact's 128-token block among the top-k. The loss is the cross-entropy of
the answers (chance: ln(values)).

Training runs under `jax.jit` on a (data x context) mesh: the batch is split
over `data`, the sequence over `context` in zig-zag layout order (balanced
causal work; see `jax_msa.context_parallel`). The first `--dense-fraction` of
the steps use dense attention while the indexer learns from it through
`jax_msa.indexer_kl_loss` (MSA's warm-up); then the model switches to MSA.
On a CPU the devices are emulated (XLA_FLAGS=--xla_force_host_platform_device_count).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=int, default=2, help="mesh size along the batch (data parallelism)")
    p.add_argument("--context", type=int, default=2, help="mesh size along the sequence (context parallelism)")
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dense-fraction", type=float, default=0.25, help="share of the steps in dense warm-up")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--facts", type=int, default=8, help="key-value facts per sequence")
    p.add_argument("--queries", type=int, default=32, help="queries per sequence")
    p.add_argument("--keys", type=int, default=8, help="distinct keys")
    p.add_argument("--values", type=int, default=8, help="distinct values")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--index-head-dim", type=int, default=32)
    p.add_argument("--topk", type=int, default=2, help="128-token blocks per query (local block included)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--indexer-loss-coeff", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


ARGS = parse_args()
if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Emulated devices for the CPU backend; real accelerators ignore it.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.data * ARGS.context}")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

from jax_msa import context_parallel as cp  # noqa: E402
from jax_msa.flax import MSAAttention  # noqa: E402


class Vocab:
    """Token ids: filler, facts (key, value), queries (key), answers (value)."""

    def __init__(self, keys: int, values: int, filler: int = 4):
        self.keys, self.values, self.filler = keys, values, filler
        self.fact = filler
        self.query = self.fact + keys * values
        self.answer = self.query + keys
        self.size = self.answer + values


def make_batch(rng: np.random.Generator, vocab: Vocab, batch: int, seq_len: int, facts: int, queries: int):
    """Natural-order (tokens, targets, answer mask), each [batch, seq_len]."""
    tokens = rng.integers(0, vocab.filler, (batch, seq_len))
    tail = seq_len - 2 * queries  # queries and answers fill the end
    for row in tokens:
        keys = rng.choice(vocab.keys, facts, replace=False)
        values = rng.integers(0, vocab.values, facts)
        row[rng.choice(tail, facts, replace=False)] = vocab.fact + keys * vocab.values + values
        asked = rng.integers(0, facts, queries)
        row[tail::2] = vocab.query + keys[asked]
        row[tail + 1::2] = vocab.answer + values[asked]
    targets = np.roll(tokens, -1, axis=1)
    mask = np.zeros_like(tokens, dtype=bool)
    mask[:, seq_len - 2 * queries::2] = True
    return tokens.astype(np.int32), targets.astype(np.int32), mask


class Block(nnx.Module):
    def __init__(self, args, par: cp.ContextParallel, dtype, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(args.embed, rngs=rngs)
        self.attn = MSAAttention(args.embed, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                 head_dim=args.head_dim, index_head_dim=args.index_head_dim, topk=args.topk,
                                 indexer_loss_coeff=args.indexer_loss_coeff, context_parallel=par, dtype=dtype,
                                 rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(args.embed, rngs=rngs)
        self.up = nnx.Linear(args.embed, 4 * args.embed, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(4 * args.embed, args.embed, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions):
        y, indexer_loss = self.attn(self.attn_norm(x), positions)
        x = x + y
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x)))), indexer_loss


class LM(nnx.Module):
    def __init__(self, args, vocab_size: int, par: cp.ContextParallel, rngs: nnx.Rngs):
        dtype = jnp.dtype(args.dtype)
        self.embed = nnx.Embed(vocab_size, args.embed, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(args, par, dtype, rngs) for _ in range(args.layers)])
        self.norm = nnx.RMSNorm(args.embed, rngs=rngs)
        self.head = nnx.Linear(args.embed, vocab_size, dtype=dtype, rngs=rngs)

    def set_attention(self, kind: str) -> None:
        for block in self.blocks:
            block.attn.attention = kind

    def __call__(self, tokens, positions):
        """tokens, positions [B, S] (layout order) -> (logits [B, S, V], summed indexer loss)."""
        x, indexer_loss = self.embed(tokens), 0.0
        for block in self.blocks:
            x, loss = block(x, positions)
            indexer_loss += loss
        return self.head(self.norm(x)).astype(jnp.float32), indexer_loss


def main(args: argparse.Namespace) -> None:
    n = args.data * args.context
    if len(jax.devices()) < n:
        sys.exit(f"needs {n} devices (--data x --context), found {len(jax.devices())}")
    mesh = Mesh(np.array(jax.devices()[:n]).reshape(args.data, args.context), ("data", "context"))
    par = cp.ContextParallel(mesh, "context", batch_axes="data", layout=args.layout)
    vocab = Vocab(args.keys, args.values)
    print(f"devices: {n} x {jax.devices()[0].platform} as (data={args.data}, context={args.context}); "
          f"seq {args.seq_len}, batch {args.batch}, top-{args.topk} of {-(-args.seq_len // 128)} blocks")
    for layout in ("contiguous", args.layout):
        work = cp.work_per_shard(args.seq_len, args.context, layout)
        print(f"causal pairs per context shard, {layout:10s}: {work.tolist()} "
              f"(max/mean {work.max() / work.mean():.2f})")

    model = LM(args, vocab.size, par, nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, args.steps // 10), args.steps, args.lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    graphdef, params = nnx.split(model)
    opt_state = optimizer.init(params)
    batch_sharding = NamedSharding(mesh, par.spec("bq"))
    order = cp.layout_permutation(args.seq_len, args.context, args.layout)  # token stored at each position
    positions = np.broadcast_to(order, (args.batch, args.seq_len)).astype(np.int32)

    def loss_fn(params, graphdef, tokens, targets, mask):
        logits, indexer_loss = nnx.merge(graphdef, params)(tokens, positions)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        answer_loss = jnp.sum(ce * mask) / jnp.sum(mask)
        accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / jnp.sum(mask)
        return answer_loss + indexer_loss, (answer_loss, indexer_loss, accuracy)

    def train_step(params, opt_state, graphdef, tokens, targets, mask):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, graphdef, tokens, targets, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    step_fn = jax.jit(train_step, static_argnums=2, donate_argnums=(0, 1))
    rng = np.random.default_rng(args.seed)
    dense_steps = int(args.steps * args.dense_fraction)
    tokens_seen, train_time, compile_time, start, window = 0, 0.0, 0.0, time.perf_counter(), []
    for step in range(args.steps):
        phase_start = step in (0, dense_steps)
        if phase_start:
            model = nnx.merge(graphdef, params)
            model.set_attention("dense" if step < dense_steps else "msa")
            graphdef, params = nnx.split(model)
            print(f"step {step}: {'dense attention warm-up' if step < dense_steps else 'MSA (sparse) attention'}")
        batch = make_batch(rng, vocab, args.batch, args.seq_len, args.facts, args.queries)
        batch = [jax.device_put(x[:, order], batch_sharding) for x in batch]
        clock = time.perf_counter()
        params, opt_state, metrics = jax.block_until_ready(step_fn(params, opt_state, graphdef, *batch))
        elapsed = time.perf_counter() - clock
        if phase_start:  # includes compilation
            compile_time += elapsed
        else:
            tokens_seen, train_time = tokens_seen + args.batch * args.seq_len, train_time + elapsed
        window.append([float(m) for m in metrics])
        if step % args.log_every == 0 or step == args.steps - 1:
            answer_loss, indexer_loss, accuracy = np.mean(window, axis=0)  # over the steps since the last line
            window = []
            rate = f"{tokens_seen / train_time:,.0f} tokens/s" if train_time else "compiling"
            print(f"step {step:5d}  answer loss {answer_loss:.3f}  accuracy {accuracy:.2f}  "
                  f"indexer KL {indexer_loss:.3f}  {rate}", flush=True)
    print(f"chance: answer loss ln({args.values}) = {np.log(args.values):.3f}. "
          f"Total {time.perf_counter() - start:.0f}s ({compile_time:.0f}s in the two compiling steps).")


if __name__ == "__main__":
    main(ARGS)
