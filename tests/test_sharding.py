"""Sharded == unsharded on 8 emulated CPU devices: data, head and context
parallelism, the collectives in the compiled HLO, warnings for unsupported
splits, and the causal load balance of the zig-zag layout.

JAX fixes its device count when the backend starts, and other test modules
start it first; so the measurements run once in a subprocess (this file run as
a script, with XLA_FLAGS set), and the tests below assert on what it reports.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

DEVICES = 8


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_matches(errors: dict):
    for name, err in errors.items():
        bound = 0 if name.endswith("ids") else 1e-5
        assert err <= bound, f"{name}: sharded differs from unsharded by {err} (relative), bound {bound}"


@pytest.mark.parametrize("config", ["data", "heads", "mqa_heads", "context", "data_context_heads"])
def test_jit_sharding_matches_unsharded(report, config):
    result = report["jit"][config]
    assert {"msa_out", "msa_ids", "msa_dk", "dense_dv", "indexer_lse", "block_scores", "topk_select_ids"} <= set(
        result["errors"])
    _assert_matches(result["errors"])
    assert result["warnings"] == []


@pytest.mark.parametrize("config", ["data", "heads"])
def test_data_and_head_sharding_need_no_collective(report, config):
    # Forward and backward of every op, all local: not even an all-reduce.
    assert report["jit"][config]["collectives"] == []


def test_mqa_head_sharding_only_sums_kv_gradients(report):
    # One KV head shared by the split query heads: dK/dV are all-reduced, nothing gathered.
    assert report["jit"]["mqa_heads"]["collectives"] == ["all-reduce"]


@pytest.mark.parametrize("config", ["context", "data_context_heads"])
def test_context_sharding_gathers_keys_and_scatters_their_gradients(report, config):
    assert report["jit"][config]["collectives"] == ["all-gather", "reduce-scatter"]


@pytest.mark.parametrize("config", ["zigzag", "contiguous", "zigzag_data_heads", "explicit_mesh"])
def test_context_parallel_shard_map_matches_unsharded(report, config):
    result = report["shard_map"][config]
    _assert_matches(result["errors"])
    assert result["collectives"] == ["all-gather", "reduce-scatter"]


def test_context_parallel_indexer_kl_loss(report):
    result = report["kl_loss"]
    if result is None:
        pytest.skip("jax_msa.indexer_kl_loss is not available")
    _assert_matches(result)


def test_unsupported_split_is_resharded_with_a_warning(report):
    result = report["unsupported"]
    _assert_matches(result["errors"])
    assert any("dimension 3" in w and "all-gathers it" in w for w in result["head_dim_warnings"])
    assert any("kv head counts [2]" in w for w in result["uneven_heads_warnings"])
    assert any("jax_msa_test_whole: operand 0" in w and "dimension 0 (a dimension kept whole)" in w
               for w in result["whole_warnings"])
    # A warnings filter turns the reshard into an error.
    assert "ShardingWarning" in result["as_error"] and "dimension 3" in result["as_error"]


def test_eager_call_on_sharded_inputs(report):
    result = report["eager"]
    _assert_matches(result["errors"])
    assert result["out_spec"] == ["data", None, "model", None]


def test_gspmd_partitioner_matches(report):
    result = report["gspmd"]
    if result is None:
        pytest.skip("this jax has no GSPMD partitioner switch")
    _assert_matches(result["errors"])
    assert result["collectives"] == ["all-gather", "reduce-scatter"]


def test_flax_block_context_parallel_matches(report):
    result = report["flax"]
    if result is None:
        pytest.skip("flax is not installed")
    assert any("index_q_proj" in name for name in result)
    _assert_matches(result)


def test_zigzag_balances_causal_work(report):
    work = report["balance"]
    print("\nper-shard causal work, S=8192 over 4 shards (max/mean):")
    for name, values in work.items():
        print(f"  {name:22s} {values}  {max(values) / (sum(values) / len(values)):.3f}")
    imbalance = {name: max(values) / (sum(values) / len(values)) for name, values in work.items()}
    # The quadratic work (dense attention, the indexer) is even under zig-zag; sparse attention's
    # (at most topk blocks per query) is nearly even either way.
    assert imbalance["contiguous pairs"] > 1.7 and imbalance["zigzag pairs"] < 1.001
    assert imbalance["zigzag sparse keys"] <= imbalance["contiguous sparse keys"] < 1.2


# --------------------------------------------------------------------------- #
# The measurements, run in the subprocess.
# --------------------------------------------------------------------------- #
def _measure() -> dict:
    import re
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_msa
    from jax_msa import context_parallel as cp
    from jax_msa._primitives import define_primitive

    assert len(jax.devices()) == DEVICES, jax.devices()
    warnings.simplefilter("always", jax_msa.ShardingWarning)
    rng = np.random.default_rng(0)
    B, S, D, DI, TOPK = 4, 512, 32, 32, 2
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    q_lengths = jnp.asarray([512, 300, 512, 129], jnp.int32)
    kv_lengths = jnp.asarray([512, 400, 512, 200], jnp.int32)

    def inputs(hq, hkv):
        return dict(q=normal(B, S, hq, D), k=normal(B, S, hkv, D), v=normal(B, S, hkv, D),
                    qi=normal(B, S, hkv, DI), ki=normal(B, S, DI))

    def all_ops(x, ct, msa=jax_msa.msa_attention, sparse=jax_msa.sparse_attention,
                dense=jax_msa.dot_product_attention, indexer=jax_msa.indexer, split_indexer=True):
        """Every op, forward and VJP with fixed cotangents (no loss reduction to
        add collectives of its own): a dict of results."""
        ln = dict(q_lengths=q_lengths, kv_lengths=kv_lengths)
        r = {}
        r["msa_out"], pull, r["msa_ids"] = jax.vjp(
            lambda q, k, v: msa(q, k, v, x["qi"], x["ki"], topk=TOPK, return_ids=True, **ln), x["q"], x["k"], x["v"],
            has_aux=True)
        r["msa_dq"], r["msa_dk"], r["msa_dv"] = pull(ct["out"])
        (r["sparse_out"], r["sparse_lse"]), vjp = jax.vjp(
            lambda q, k, v: sparse(q, k, v, r["msa_ids"], return_lse=True, **ln), x["q"], x["k"], x["v"])
        r["sparse_dq"], r["sparse_dk"], r["sparse_dv"] = vjp((ct["out"], ct["lse"]))
        for name, causal in (("dense", True), ("dense_noncausal", False)):
            (r[f"{name}_out"], r[f"{name}_lse"]), vjp = jax.vjp(
                lambda q, k, v: dense(q, k, v, causal=causal, return_lse=True, **ln), x["q"], x["k"], x["v"])
            r[f"{name}_dq"], r[f"{name}_dk"], r[f"{name}_dv"] = vjp((ct["out"], ct["lse"]))
        r["indexer_ids"], r["indexer_lse"] = indexer(x["qi"], x["ki"], topk=TOPK, return_lse=True, **ln)
        if split_indexer:
            r["block_scores"] = jax_msa.block_scores(x["qi"], x["ki"], **ln)
            r["topk_select_ids"] = jax_msa.topk_select(r["block_scores"], topk=TOPK, kv_seq_len=S, **ln)
        return r

    def cotangents(x):
        hq = x["q"].shape[2]
        return dict(out=normal(B, S, hq, D), lse=normal(B, S, hq))

    def compare(got, want) -> dict:
        errors = {}
        for name in want:
            a, b = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
            if name.endswith("ids"):
                errors[name] = float(np.sum(a != b))
            else:
                finite = np.isfinite(b)
                assert np.array_equal(finite, np.isfinite(a)), name
                errors[name] = float(np.linalg.norm(a[finite] - b[finite]) / max(np.linalg.norm(b[finite]), 1e-30))
        return errors

    def collectives(text: str) -> list:
        return sorted(set(re.findall(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                                     r"(?:-start)?\(", text)))

    def run_sharded(fn, args, mesh, specs):
        print(f"compiling for {mesh.shape} with {jax.tree.leaves(specs)}", file=sys.stderr)  # for failures
        placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), args, specs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", jax_msa.ShardingWarning)
            compiled = jax.jit(fn).lower(*placed).compile()
            result = compiled(*placed)
        return result, collectives(compiled.as_text()), [str(w.message) for w in caught]

    report = {}
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "ctx", "model"))

    # --- jit with sharded inputs (the ops' own partitioning) ---------------------
    def jit_case(x, q_spec, k_spec, ki_spec):
        ct = cotangents(x)
        want = jax.jit(all_ops)(x, ct)
        x_specs = dict(q=q_spec, k=k_spec, v=k_spec, qi=q_spec if x["qi"].shape[2] > 1 else P(*q_spec[:2]),
                       ki=ki_spec)
        got, coll, warns = run_sharded(all_ops, (x, ct), mesh, (x_specs, dict(out=q_spec, lse=P(*q_spec[:3]))))
        return dict(errors=compare(got, want), collectives=coll, warnings=warns)

    gqa, mqa = inputs(4, 2), inputs(4, 1)
    report["jit"] = {
        "data": jit_case(gqa, P("data"), P("data"), P("data")),
        "heads": jit_case(gqa, P(None, None, "model"), P(None, None, "model"), P()),
        "mqa_heads": jit_case(mqa, P(None, None, "model"), P(), P()),
        "context": jit_case(gqa, P(None, "ctx"), P(None, "ctx"), P(None, "ctx")),
        "data_context_heads": jit_case(gqa, P("data", "ctx", "model"), P("data", "ctx", "model"),
                                       P("data", "ctx")),
    }

    # --- the shard_map form, zig-zag and contiguous ------------------------------
    def shard_map_case(par):
        n = par.num_shards
        x, ct = gqa, cotangents(gqa)
        want = jax.jit(functools.partial(all_ops, split_indexer=False))(x, ct)
        # The inputs are permuted into layout order before they are split, the results after they are gathered.
        to, back = (lambda t: cp.to_layout(t, n, par.layout)), (lambda t: cp.from_layout(t, n, par.layout))
        x, ct = jax.tree.map(to, x), jax.tree.map(to, ct)
        fn = functools.partial(all_ops, msa=par.msa_attention, sparse=par.sparse_attention,
                               dense=par.dot_product_attention, indexer=par.indexer, split_indexer=False)
        compiled = jax.jit(fn).lower(x, ct).compile()
        got = jax.tree.map(lambda t: back(np.asarray(t)), compiled(x, ct))
        return dict(errors=compare(got, want), collectives=collectives(compiled.as_text()))

    mesh_2x4 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "ctx"))
    explicit = jax.make_mesh((2, 4), ("data", "ctx"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    report["shard_map"] = {
        "zigzag": shard_map_case(cp.ContextParallel(mesh_2x4, "ctx", batch_axes="data")),
        "contiguous": shard_map_case(cp.ContextParallel(mesh_2x4, "ctx", batch_axes="data", layout="contiguous")),
        "zigzag_data_heads": shard_map_case(cp.ContextParallel(mesh, "ctx", batch_axes="data", head_axes="model")),
        "explicit_mesh": shard_map_case(cp.ContextParallel(explicit, "ctx", batch_axes="data")),
    }

    # --- indexer_kl_loss, context-parallel ---------------------------------------
    report["kl_loss"] = None
    if hasattr(jax_msa, "indexer_kl_loss"):
        x = gqa
        ids = jax_msa.indexer(x["qi"], x["ki"], topk=TOPK, q_lengths=q_lengths, kv_lengths=kv_lengths)
        par = cp.ContextParallel(mesh, "ctx", batch_axes="data", head_axes="model")
        to = lambda t: cp.to_layout(t, 2)  # noqa: E731

        def kl(loss_fn, layout):
            def value(qi, ki):
                return loss_fn(layout(x["q"]), layout(x["k"]), layout(qi), layout(ki), layout(ids),
                               q_lengths=q_lengths, kv_lengths=kv_lengths, coeff=0.5)
            return jax.jit(jax.value_and_grad(value, argnums=(0, 1)))(x["qi"], x["ki"])

        (lw, (gqi_w, gki_w)), (lg, (gqi, gki)) = kl(jax_msa.indexer_kl_loss, lambda t: t), kl(par.indexer_kl_loss, to)
        report["kl_loss"] = compare(dict(loss=lg, dqi=gqi, dki=gki), dict(loss=lw, dqi=gqi_w, dki=gki_w))

    # --- unsupported splits: resharded, with a warning (or an error) --------------
    x, ct = gqa, cotangents(gqa)
    want = jax.jit(all_ops)(x, ct)
    d_split = P(None, None, None, "model")
    got, _, head_dim_warnings = run_sharded(all_ops, (x, ct), mesh, (dict(q=d_split, k=P(), v=P(), qi=P(), ki=P()),
                                                                      dict(out=P(), lse=P())))
    mesh_2x4m = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    heads4 = P(None, None, "model")
    got_uneven, _, uneven_warnings = run_sharded(all_ops, (x, ct), mesh_2x4m,
                                                 (dict(q=heads4, k=P(), v=P(), qi=P(), ki=P()),
                                                  dict(out=heads4, lse=heads4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", jax_msa.ShardingWarning)
        q_split = jax.device_put(x["q"], NamedSharding(mesh, d_split))
        try:
            jax.jit(lambda q: jax_msa.dot_product_attention(q, x["k"], x["v"])).lower(q_split).compile()
            as_error = "no error"
        except Exception as e:  # noqa: BLE001 - report whatever surfaced
            as_error = f"{type(e).__name__}: {e}"
    # A primitive without a layout runs whole on every device.
    whole_p = define_primitive("test_whole", abstract_eval=lambda x: [jax.core.ShapedArray(x.shape, x.dtype)],
                               reference=lambda x: [2 * x], ffi_attributes=())
    x_whole = normal(8, 16)
    got_whole, _, whole_warnings = run_sharded(lambda x: whole_p.bind(x, implementation="auto")[0], (x_whole,),
                                               mesh, (P("data"),))
    report["unsupported"] = dict(errors={**compare(got, want), **{f"uneven_{k}": v for k, v in
                                                                    compare(got_uneven, want).items()},
                                         **compare(dict(whole=got_whole), dict(whole=2 * x_whole))},
                                 head_dim_warnings=head_dim_warnings, uneven_heads_warnings=uneven_warnings,
                                 whole_warnings=whole_warnings, as_error=as_error)

    # --- eager, outside jit ---------------------------------------------------------
    spec = P("data", None, "model")
    placed = {n: jax.device_put(a, NamedSharding(mesh, spec if n != "ki" else P("data"))) for n, a in gqa.items()}
    out = jax_msa.msa_attention(placed["q"], placed["k"], placed["v"], placed["qi"], placed["ki"], topk=TOPK)
    ref = jax_msa.msa_attention(gqa["q"], gqa["k"], gqa["v"], gqa["qi"], gqa["ki"], topk=TOPK)
    report["eager"] = dict(errors=compare(dict(out=out), dict(out=ref)),
                           out_spec=list(out.sharding.spec) + [None] * (4 - len(out.sharding.spec)))

    # --- the GSPMD partitioner (older setups) ---------------------------------------
    report["gspmd"] = None
    try:
        jax.config.update("jax_use_shardy_partitioner", False)
    except (AttributeError, ValueError):  # jax without GSPMD
        pass
    else:
        report["gspmd"] = jit_case(gqa, P("data", "ctx", "model"), P("data", "ctx", "model"), P("data", "ctx"))
        jax.config.update("jax_use_shardy_partitioner", True)

    # --- the Flax block, context-parallel (data x context x heads) -------------------
    report["flax"] = None
    try:
        from flax import nnx
        from jax_msa.flax import MSAAttention
    except ImportError:
        pass
    else:
        par = cp.ContextParallel(mesh, "ctx", batch_axes="data", head_axes="model")
        x, ct = normal(B, S, 64), normal(B, S, 64)
        lengths = jnp.asarray([512, 300, 512, 129], jnp.int32)

        def flax_case(context_parallel, layout):
            block = MSAAttention(64, num_heads=4, num_kv_heads=2, head_dim=16, index_head_dim=16, topk=TOPK,
                                 context_parallel=context_parallel, rngs=nnx.Rngs(0))
            graphdef, params = nnx.split(block)

            def loss(params):
                y, indexer_loss = nnx.merge(graphdef, params)(layout(x), lengths=lengths)
                return jnp.sum(y * layout(ct)) + indexer_loss, (y, indexer_loss)

            grads, (y, indexer_loss) = jax.jit(jax.grad(loss, has_aux=True))(params)
            named_grads = {f"grad{jax.tree_util.keystr(path)}": g for path, g in
                           jax.tree_util.tree_leaves_with_path(grads)}
            return dict(y=y if context_parallel is None else cp.from_layout(y, 2), indexer_loss=indexer_loss,
                        **named_grads)

        report["flax"] = compare(flax_case(par, lambda t: cp.to_layout(t, 2)), flax_case(None, lambda t: t))

    report["balance"] = {
        "contiguous pairs": cp.work_per_shard(8192, 4, "contiguous").tolist(),
        "zigzag pairs": cp.work_per_shard(8192, 4, "zigzag").tolist(),
        "contiguous sparse keys": cp.work_per_shard(8192, 4, "contiguous", topk=16).tolist(),
        "zigzag sparse keys": cp.work_per_shard(8192, 4, "zigzag", topk=16).tolist(),
    }
    return report


if __name__ == "__main__":
    print(json.dumps(_measure()))
