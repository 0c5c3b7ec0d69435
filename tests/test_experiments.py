"""The benchmark oracles against independent float64 formulas, and the harness's correctness gate."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from experiments import bench_common as bc
from experiments.references import delta_rule_reference, gated_linear_reference, softmax_reference

B, T, H, K, V = 2, 19, 3, 8, 5


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def _gates(seed, *shape):
    return -np.random.default_rng(seed).uniform(0.01, 1.0, shape)


@pytest.mark.parametrize("kind", ["none", "g", "gk", "both"])
def test_gated_linear_reference_matches_dense_form(kind):
    q, k, v = _rand(0, B, T, H, K), _rand(1, B, T, H, K), _rand(2, B, T, H, V)
    g = _gates(3, B, T, H) if kind in ("g", "both") else np.zeros((B, T, H))
    gk = _gates(4, B, T, H, K) if kind in ("gk", "both") else np.zeros((B, T, H, K))
    # dense form: o_t = scale Σ_{s<=t} Σ_c q_tc k_sc exp(G_tc − G_sc) v_s, G = cumsum(g + gk)
    G = np.cumsum(gk + g[..., None], axis=1)
    dec = np.exp(G[:, :, None] - G[:, None, :])  # [B, t, s, H, K]
    scores = np.einsum("bthc,bshc,btshc->bhts", q, k, dec) * np.tril(np.ones((T, T)))
    want = K**-0.5 * np.einsum("bhts,bshv->bthv", scores, v)
    got = gated_linear_reference(q, k, v, g=None if kind in ("none", "gk") else jnp.asarray(g),
                                 gk=None if kind in ("none", "g") else jnp.asarray(gk))
    assert bc.rel_err(got, want) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_reference_matches_loop(gated):
    q, k, v = _rand(5, B, T, H, K), _rand(6, B, T, H, K), _rand(7, B, T, H, V)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = np.random.default_rng(8).uniform(0.1, 0.9, (B, T, H))
    g = _gates(9, B, T, H) if gated else np.zeros((B, T, H))
    S = np.zeros((B, H, K, V))
    want = np.zeros((B, T, H, V))
    for t in range(T):
        S = S * np.exp(g[:, t])[..., None, None]
        u = v[:, t] - np.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + beta[:, t][..., None, None] * np.einsum("bhk,bhv->bhkv", k[:, t], u)
        want[:, t] = K**-0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    got = delta_rule_reference(q, k, v, beta, g=jnp.asarray(g) if gated else None)
    assert bc.rel_err(got, want) < 1e-5


def test_softmax_reference_matches_dense_with_empty_rows():
    q, k, v = _rand(10, B, T, 4, K), _rand(11, B, T, 2, K), _rand(12, B, T, 2, V)  # GQA 4:2
    visible = lambda i, j: (j <= i) & (j > i - 5) & (i != 3)  # row 3 sees nothing
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = np.asarray(visible(i, j))
    kk, vv = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    s = np.where(allowed, np.einsum("bqhd,bkhd->bhqk", q, kk) * K**-0.5, -np.inf)
    p = np.exp(s - np.max(np.where(allowed, s, -1e30), axis=-1, keepdims=True))
    p = np.where(allowed, p, 0) / np.maximum(np.sum(np.where(allowed, p, 0), -1, keepdims=True), 1e-300)
    want = np.einsum("bhqk,bkhd->bqhd", p, vv)
    got = softmax_reference(q, k, v, visible, block_q=8)
    assert np.all(np.asarray(got)[:, 3] == 0)
    assert bc.rel_err(got, want) < 1e-5


def _problem():
    def make(seed, check):
        ks = jax.random.split(jax.random.key(seed), 4)
        t = 8 if check else T
        return tuple(jax.random.normal(kk, (B, t, H, K), jnp.bfloat16) for kk in ks)

    ref = lambda q, k, v: gated_linear_reference(q, k, v)
    return bc.Problem.build(("q", "k", "v"), make, ref, rotations=2), ref


FLOPS = {"fwd": 1e6, "fwd+bwd": 3e6}  # fixed counts for the harness tests


def _run_harness(tmp_path, impl, problem, f, directions=bc.DIRECTIONS):
    """run_impl on ``f`` for ``problem`` with fixed FLOP counts; returns the Bench with its rows."""
    bench = bc.Bench("t", str(tmp_path), bc.ASSUMED_CEILINGS)
    template = bc.Row("t", "c", impl, "", B, T, H, K, K)
    bc.run_impl(bench, problem, f, "jax", template, FLOPS, bc.io_bytes(problem), directions)
    return bench


def _common_args(*argv):
    """The bench scripts' common flags (``bench_common.add_common_args``) parsed from ``argv``."""
    import argparse

    ap = argparse.ArgumentParser()
    bc.add_common_args(ap)
    return ap.parse_args(list(argv))


@pytest.mark.parametrize("variant, status", [("exact", "ok"), ("scaled", "wrong"), ("nan", "wrong")])
def test_harness_gate_passes_the_oracle_and_fails_wrong_outputs(tmp_path, variant, status):
    problem, ref = _problem()
    f = {"exact": lambda q, k, v: ref(q, k, v).astype(q.dtype),
         "scaled": lambda q, k, v: 1.05 * ref(q, k, v),
         "nan": lambda q, k, v: ref(q, k, v).at[:, -1].set(jnp.nan)}[variant]
    bench = _run_harness(tmp_path, variant, problem, f)
    assert [r.status for r in bench.rows] == [status, status]
    assert all(r.ms is not None and r.ms > 0 for r in bench.rows)
    assert set(bench.rows[1].err) == {"o", "dq", "dk", "dv"}
    assert (tmp_path / "t.json").exists() and (tmp_path / "t.csv").exists()


def test_directions_flag_limits_the_passes_checked_and_timed(tmp_path):
    assert _common_args().directions == list(bc.DIRECTIONS)
    args = _common_args("--directions", "fwd+bwd")
    problem, ref = _problem()
    bench = _run_harness(tmp_path, "exact", problem, lambda q, k, v: ref(q, k, v).astype(q.dtype),
                         args.directions)
    assert [(r.direction, r.status) for r in bench.rows] == [("fwd+bwd", "ok")]


def test_sweep_tag_names_every_row_and_keeps_the_peer_ratios(tmp_path):
    args = _common_args("--out", str(tmp_path), "--assume-ceilings", "--directions", "fwd",
                        "--tokens", str(B * T))
    args.impls = ["mine", "peer"]
    problem, ref = _problem()
    exact = lambda case: (lambda q, k, v: ref(q, k, v).astype(q.dtype))
    impls = {"mine": ("jax", exact), "peer": ("jax", exact)}
    counts = lambda case, p, b, t: (FLOPS, bc.io_bytes(p))
    bench = bc.run_sweep("t", args, [("c", T)], impls, lambda case, b, t: problem, counts,
                         ["peer"], tag="gate shift 0")
    assert [(r.impl, r.status) for r in bench.rows] == [("mine (gate shift 0)", "ok"),
                                                        ("peer (gate shift 0)", "ok")]
    summary = (tmp_path / "t_summary.txt").read_text()
    assert "xpeer (gate shift 0)" in summary


def test_json_from_log_reads_back_the_rows_bench_prints(tmp_path):
    from experiments.json_from_log import rebuild

    env = {"date_utc": "2026-12-07 05:40 UTC", "device": "cpu", "jax": jax.__version__}
    ceilings = {"matmul_bf16_tflops": 700.0, "hbm_tbps": 2.9}
    rows = [bc.Row("bench_linear", "gk", "attnlab mosaic_gpu_gk", "fwd+bwd", 8, 4096, 16, 128,
                   128, status="ok", ms=4.2087, x_floor=5.43, err={"o": 3.2e-3, "dq": 3.5e-3}),
            bc.Row("bench_linear", "none", "jla mosaic_gpu", "fwd", 1, 65536, 16, 128, 128,
                   status="ok", ms=0.674, x_floor=1.87, err={"o": 2.3e-3}, note="a note"),
            bc.Row("bench_linear", "g", "all", "", 1, 65536, 16, 128, 128, status="skipped",
                   note="skipped: deadline")]
    log = tmp_path / "run.log"
    log.write_text(f"[bench_linear] {env}\n[bench_linear] ceilings {ceilings}\n"
                   + "".join(f"{bc._format_row(r)} @{9 * i}s\n" for i, r in enumerate(rows)))
    got = rebuild(str(log), 32768, 16, 128, 128)
    assert got["env"] == env and got["ceilings"] == ceilings and got["bench"] == "bench_linear"
    assert [(r["case"], r["impl"], r["direction"], r["B"], r["T"], r["ms"], r["x_floor"],
             r["err"], r["note"]) for r in got["rows"]] == [
        ("gk", "attnlab mosaic_gpu_gk", "fwd+bwd", 8, 4096, 4.209, 5.4, {"max": 3.5e-3}, ""),
        ("none", "jla mosaic_gpu", "fwd", 1, 65536, 0.674, 1.9, {"max": 2.3e-3}, "a note")]


def test_traced_with_reaches_a_custom_vjp_backward():
    """A variant's switch read in a custom_vjp's backward (traced when the vjp is applied,
    after the function returned) takes effect under ``patched``, and is restored after."""
    from types import SimpleNamespace

    switches = SimpleNamespace(FACTOR=1.0)

    @jax.custom_vjp
    def f(x):
        return x

    f.defvjp(lambda x: (x, None), lambda _, g: (g * switches.FACTOR,))
    variant = bc.traced_with(switches, "FACTOR", 3.0, f)

    def grad():   # a fresh function each time: jit caches its traces per function
        def run(x):
            o, vjp = jax.vjp(variant, x)
            return vjp(jnp.ones_like(o))[0]
        return jax.jit(run)(jnp.ones(()))

    assert float(grad()) == 1.0  # outside the harness: the default backward
    with bc.patched(variant):
        assert float(grad()) == 3.0
    assert switches.FACTOR == 1.0


def test_select_rows_keeps_the_last_listed_run_and_only_the_named_impls(tmp_path):
    import json

    from experiments.results_table import select_rows

    env = {"date_utc": "2026-12-07 17:00 UTC", "device": "cpu"}
    for run, ms in (("h100_2026-12-07_a", 1.0), ("h100_2026-12-07_b", 2.0)):
        rows = [dict(bench="bench_linear", case="gk", T=4096, B=8, direction="fwd", impl=impl,
                     status="ok", ms=ms, err={}) for impl in ("ours", "peer", "variant")]
        (tmp_path / run).mkdir()
        (tmp_path / run / "bench_linear.json").write_text(
            json.dumps({"env": env, "ceilings": {}, "rows": rows}))
    for order, want in ((["a", "b"], 2.0), (["b", "a"], 1.0)):
        rows, _ = select_rows("bench_linear", order, ["ours", "peer"], str(tmp_path))
        assert sorted((r["impl"], r["ms"]) for r in rows) == [("ours", want), ("peer", want)]
    with pytest.raises(ValueError, match=r"\['c'\]"):
        select_rows("bench_linear", ["a", "c"], None, str(tmp_path))


def test_no_choice_variant_takes_the_form_the_choice_takes_for_the_bench_gates():
    """The bench's gates (and strong ones, shift 0) are bounded, so its no_choice variant times
    the default call's form; steep gates (shift -3) take the exact form."""
    from experiments import bench_linear as bl
    from pallas_kernels.linear import mosaic_gpu_gk as mg

    forms = mg.prepass.FORMS
    for shift, form in ((bl.GATE_SHIFT, "bounded"), (0.0, "bounded"), (-3.0, "exact")):
        lg = bl.make_inputs("gk", 1, 1024, shift)(0, False)[3]
        assert int(mg.gate_bounds(lg)) == forms.index(form), shift
    real = mg.gate_bounds
    variant = bl.attnlab_gk_no_choice_fn("gk")
    with bc.patched(variant):
        steep = bl.make_inputs("gk", 1, 1024, -3.0)(0, False)[3]
        assert int(mg.gate_bounds(steep)) == forms.index("bounded")
    assert mg.gate_bounds is real
