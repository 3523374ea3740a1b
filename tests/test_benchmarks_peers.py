"""Tests of the benchmark helpers: the step under test, FLOP counts, the worker protocol, and
smoke runs of the scaling and GPU scripts at tiny sizes (slow tier).

    .venv/bin/python -m pytest -q tests/test_benchmarks_peers.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank as lr
from lowrank.train.task import default_forward

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is not installed: import it from the checkout, however pytest was started.
sys.path.insert(0, str(REPO))
from benchmarks.peers import lowrank_steps as ls  # noqa: E402
from benchmarks.peers import workers  # noqa: E402


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128, name="hidden")(x))
        return nn.Dense(3, name="out")(x)


def _mlp_problem():
    model = _Mlp()
    x = jax.random.normal(jax.random.key(0), (32, 64))
    params = model.init(jax.random.key(1), x)["params"]
    batch = {"inputs": x, "labels": jnp.arange(32, dtype=jnp.int32) % 3}
    return model, params, batch


def test_model_flops_formulas():
    # 6NT for full; 4NT + 6TP for LoRA: N=1000, T=10, P=50.
    assert ls.model_flops("full", 1000, 10) == 60_000
    assert ls.model_flops("lora", 1000, 10, 50) == 40_000 + 3_000
    assert ls.model_flops("qlora", 1000, 10, 50) == ls.model_flops("lora", 1000, 10, 50)
    with pytest.raises(ValueError, match="'dora' is not one of"):
        ls.model_flops("dora", 1000, 10)


def test_matmul_params_counts_kernels_only():
    model, params, _ = _mlp_problem()
    assert ls.matmul_params(params) == 64 * 128 + 128 * 3
    assert ls.matmul_params({"emb": {"embedding": jnp.ones((10, 4))}}) == 0


def test_lora_and_qlora_steps_train_and_account_memory():
    model, params, batch = _mlp_problem()
    spec = lr.LoraSpec(rank=4, alpha=8, targets=r"hidden/kernel", trainable=r"out/.*")
    quant = lr.QuantSpec("nf4", 64, double_quant=True, targets=r"hidden/.*")
    kwargs = dict(model=model, params=params, batch=batch, forward=default_forward,
                  loss="classification", spec=spec, quant=quant, learning_rate=1e-2)
    lora = ls.make_step(mode="lora", **kwargs)
    qlora = ls.make_step(mode="qlora", **kwargs)
    full = ls.make_step(mode="full", **{**kwargs, "spec": None})
    for step in (lora, qlora, full):
        for _ in range(5):
            step.run()
        assert step.losses[-1] < step.losses[0], step.mode
    adapters = 4 * (64 + 128)
    assert lora.adapter_params == qlora.adapter_params == adapters
    assert lora.trainable_params == adapters + 128 * 3 + 3
    assert full.trainable_params == 64 * 128 + 128 + 128 * 3 + 3
    assert qlora.quantized_params == 64 * 128 and lora.quantized_params == 0
    # The hidden kernel at 4.127 bits instead of 32: the frozen tree shrinks by about that.
    saved = lora.frozen_bytes - qlora.frozen_bytes
    assert abs(saved - 64 * 128 * (4 - 4.127 / 8)) < 64
    for step in (lora, qlora, full):
        assert step.xla["peak"] == (step.xla["argument"] + step.xla["output"]
                                    - step.xla["alias"] + step.xla["temp"])
    # Full fine-tuning donates a copy: the caller's params stay usable.
    assert float(jnp.abs(params["hidden"]["kernel"]).sum()) > 0


def test_make_step_rejects_bad_mode_and_missing_spec():
    model, params, batch = _mlp_problem()
    kwargs = dict(model=model, params=params, batch=batch, forward=default_forward,
                  loss="classification")
    with pytest.raises(ValueError, match="'half' is not one of"):
        ls.make_step(mode="half", **kwargs)
    with pytest.raises(ValueError, match="needs a LoraSpec"):
        ls.make_step(mode="lora", **kwargs)


@pytest.mark.slow
def test_qlora_step_of_scanned_llama_quantizes_only_the_layers():
    setup = ls.llama(32, 2, 4, 64, vocab=128, batch=2, seq=8)
    # per layer q, k, v, o (32 x 32) and gate, up, down (32 x 64); the head 32 x 128.
    assert setup.matmul_params == 2 * (4 * 32 * 32 + 3 * 32 * 64) + 32 * 128
    assert setup.tokens == 16
    spec = lr.LoraSpec(rank=2, targets=ls.LLAMA_TARGETS)
    quant = lr.QuantSpec("nf4", 64, double_quant=True, targets=ls.LLAMA_QUANT_TARGETS)
    step = ls.make_step(setup.model, setup.params, setup.batch, ls.lm_forward, "lm",
                        mode="qlora", spec=spec, quant=quant, layouts=setup.layouts)
    step.run()
    assert step.quantized_params == 2 * (4 * 32 * 32 + 3 * 32 * 64)  # not embedding, head
    assert np.isfinite(step.losses[0])


class _FakeWorker:
    def __init__(self, name, log, seconds):
        self.name, self.log, self.seconds = name, log, seconds

    def run(self, n):
        self.log.append(self.name)
        return {"times": [self.seconds] * n, "peak_rss": 100 + n}


def test_alternate_rotates_the_order_and_pairs_rounds():
    log = []
    fake = {k: _FakeWorker(k, log, s) for k, s in (("a", 1.0), ("b", 2.0), ("c", 4.0))}
    out = workers.alternate(fake, rounds=4, reps=3)
    assert log == ["a", "b", "c", "a", "c", "b", "c", "a", "b", "c", "b", "a"]
    assert out["a"]["round_medians"] == [1.0] * 4 and len(out["b"]["times"]) == 12
    assert out["c"]["peak_rss"] == 103
    assert workers.paired_ratio(out["a"], out["b"]) == 0.5


def test_worker_process_serves_times_and_peak_memory():
    code = textwrap.dedent("""
        import numpy as np
        from benchmarks.peers.workers import serve
        def build():
            return (lambda: np.ones(1 << 20).sum()), {"name": "toy"}
        serve(build, preload=("json",))
    """)
    w = workers.Worker([sys.executable, "-c", code])
    try:
        assert w.info["name"] == "toy" and w.info["rss_built"] >= w.info["rss_baseline"] > 0
        reply = w.run(3)
        assert len(reply["times"]) == 3 and all(t > 0 for t in reply["times"])
        # 8 MB of float64 ones were live during the steps.
        assert reply["peak_rss"] >= w.info["rss_baseline"] + 7 * 2**20
    finally:
        w.close()


def test_worker_that_dies_is_reported():
    with pytest.raises(RuntimeError, match="exited with code 3"):
        workers.Worker([sys.executable, "-c", "import sys; sys.exit(3)"])


@pytest.mark.slow
def test_scaling_tiny_run_writes_results(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--tiny", "--ranks", "1,4",
                    "--out", str(tmp_path)], cwd=REPO, check=True)
    results = json.loads((tmp_path / "scaling.json").read_text())
    assert {r["mode"] for r in results["by_size"]} == {"full", "lora", "qlora"}
    assert [r["rank"] for r in results["by_rank"]] == [1, 1, 4, 4]
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


@pytest.mark.slow
def test_gpu_script_tiny_run_on_cpu(tmp_path):
    env = {**os.environ, "LOWRANK_GPU_TINY": "1", "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(tmp_path)], env=env,
                   check=True, timeout=600)
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert results["meta"]["tiny"]
    assert set(results["bert"]) >= {"full", "lora_qv", "lora_all", "qlora_all"}
    llama = results["llama"]
    for mode in ("full", "lora", "qlora"):
        assert llama[mode]["median_ms"] > 0 and np.isfinite(llama[mode]["losses"]).all()
        assert llama[mode]["model_tflops"] > 0
    assert 0 < llama["qlora"]["frozen_mib"] < llama["lora"]["frozen_mib"]


def test_profile_categories_read_the_compiled_step_of_a_real_model():
    from benchmarks.peers import profile_step

    model, params, batch = _mlp_problem()
    step = ls.make_step(model, params, batch, default_forward, "classification", mode="lora",
                        spec=lr.LoraSpec(rank=8, targets=r"hidden/kernel"))
    hlo = step.compiled.as_text()
    names = [line.split(" = ")[0].strip().removeprefix("ROOT ").lstrip("%")
             for line in hlo[hlo.index("\nENTRY"):].splitlines() if " = " in line]
    found = profile_step.categorize({n: 1.0 for n in names}, hlo)
    # The forward and input gradient of both Dense layers, and the adapter's rank-8 products.
    assert found["matmuls"] >= 2 and found["rank-8 matmuls (LoRA)"] >= 2
    assert sum(found.values()) == len(names)  # every top-level op lands in one category
    assert profile_step.categorize({"not-an-op": 5.0}, hlo) == {}


def test_report_orders_runs_by_number():
    from benchmarks.peers.report import _run_number

    files = [Path(f"peers_minilm_run{i}.json") for i in (10, 2, 1, 9)]
    assert [p.stem[-2:].lstrip("n") for p in sorted(files, key=_run_number)] == ["1", "2", "9",
                                                                                  "10"]


# --- issue 19: the variant runs (which workers, which ratios, their tables) and the recipe step


def test_variant_expansion_and_groups():
    from benchmarks.peers import variants as vs

    out = vs.expand(list(vs.CONFIGS), [True, False], list(vs.DTYPES), list(vs.PATHS),
                    list(vs.PRNGS), list(vs.XLA_FLAGS))
    # per cell: the peer, ours on 2 paths, 2 more XLA flag sets, and with dropout on the hash PRNG
    assert len(out) == 4 * 2 * (6 + 5) and len(set(out)) == len(out)
    assert all(vs.Variant.parse(v.name) == v for v in out)
    assert not [v for v in out if v.prng == "hash" and not v.dropout]
    assert {v.path for v in out if v.prng == "hash" or v.xla not in ("none", "-")} == {"step"}
    groups = vs.groups(out, 8)
    assert all(len(g) <= 8 for g in groups) and sum(map(len, groups)) == len(out)
    assert all(len({v.cell for v in g}) == 1 for g in groups)  # 6 + 5 > 8: a cell per group
    pairs = vs.pairs(out, "threefry", "none")
    kinds = [k for k, _, _ in pairs]
    assert kinds.count("ours/peer") == len(out) - 16 and kinds.count("prng") == 8
    assert kinds.count("xla") == 2 * 16
    assert all(n.cell == d.cell and d.framework == ("peer" if k == "ours/peer" else "ours")
               for k, n, d in pairs)
    # A pair whose denominator did not start (its worker failed) is left out.
    assert not [p for p in vs.pairs(out[1:], "threefry", "none") if p[1].cell == out[0].cell
                and p[0] == "ours/peer"]
    with pytest.raises(ValueError, match="more than --max-workers 4"):
        vs.groups(out, 4)
    with pytest.raises(ValueError, match="unknown \\['fp8'\\]"):
        vs.expand(["full"], [True], ["fp8"], ["step"], ["threefry"], ["none"])
    with pytest.raises(ValueError, match="'fast' is not one of"):
        vs.expand(["full"], [True], ["float32"], ["step"], ["threefry"], ["fast"])
    assert vs.xla_flags("--xla_cpu_enable_fast_math=true") == "--xla_cpu_enable_fast_math=true"


def _synthetic_run(scale: float) -> dict:
    """A variant run as minilm_step writes it: ours' step ``scale`` x the peer's time per round
    (the recipe 1.1x the step, the hash PRNG 0.5x, oneDNN 1.0x)."""
    from benchmarks.peers import minilm_step
    from benchmarks.peers import variants as vs

    out = vs.expand(["lora_qv"], [True, False], ["float32"], ["step", "recipe"],
                    ["threefry", "hash"], ["none", "onednn"])
    peer = [1.0, 2.0, 4.0]  # drifting load: the ratios are taken round by round
    factor = {"recipe": 1.1, "hash": 0.5}
    records = {}
    for v in out:
        f = 1.0 if v.framework == "peer" else scale * factor.get(v.path, 1) * factor.get(v.prng, 1)
        medians = [f * s for s in peer]
        records[v.name] = {**dataclasses.asdict(v), "median_ms": 1e3 * medians[1],
                           "round_medians": medians, "peak_above_baseline_mb": 100 * f,
                           "xla_kinds": {"__ynn_fusion": 3}, "flag_warnings": [],
                           "hlo_sha256": "b" if v.prng == "hash" else "a"}
    meta = {"format": 2, "cpu": {"model": "AMD EPYC", "cpus": 2, "flags": ["avx512f"]},
            "xla_flags_env": "", "load_before": [0.1, 0, 0], "load_after": [1.2, 0, 0],
            "commit": "abc1234", "ours": {"jax": "0.10.2"}, "peer": {"torch": "2.13.0"},
            "rounds": 3, "reps": 1, "baseline": {"prng": "threefry", "xla": "none"}}
    return {"meta": meta, "variants": records, "failed": {"ours:x": "died\nUnknown flag"},
            "ratios": minilm_step.ratios(records, "threefry", "none")}


def test_report_ratio_tables_on_synthetic_runs():
    from benchmarks.peers import report_matrix

    run = _synthetic_run(0.8)
    by_kind = {(r["kind"], r["num"].split(":", 2)[2]): r["ratio"] for r in run["ratios"]}
    assert by_kind[("ours/peer", "dropout:float32:step:threefry:none")] == pytest.approx(0.8)
    assert by_kind[("ours/peer", "dropout:float32:recipe:threefry:none")] == pytest.approx(0.88)
    assert by_kind[("prng", "dropout:float32:step:hash:none")] == pytest.approx(0.5)
    assert by_kind[("xla", "nodropout:float32:step:threefry:onednn")] == pytest.approx(1.0)
    text = report_matrix.run_tables(run)
    assert "AMD EPYC, 2 CPUs (avx512f)" in text and "load average [0.1, 0, 0] before" in text
    assert "| lora_qv | on | float32 | 2000 | 1600 | **0.80** | 0.80 | 1760 | **0.88** | 0.88 |" \
        in text
    assert "| prng | lora_qv | on | float32 | step | hash | 1600 | 800 | **0.50** | no |" in text
    assert ("| xla | lora_qv | off | float32 | step | onednn | 1600 | 1600 | **1.00** | yes | "
            "__ynn_fusion x3 |") in text
    assert "FAILED to start: ours:x: Unknown flag" in text
    runs = {"a": run, "b": _synthetic_run(1.0), "c": _synthetic_run(1.3)}
    cross = report_matrix.cross_run_table(runs)
    assert "| lora_qv | on | float32 | ours step / peer | 3 | **1.00** | 0.80 | 1.30 |" in cross
    assert "| lora_qv | on | float32 | step hash / threefry | 3 | **0.50** | 0.50 | 0.50 |" in cross


def _tiny_bert_problem():
    from benchmarks.peers import minilm_step
    from lowrank import models

    cfg = models.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32)
    model = models.BertForSequenceClassification(cfg, num_labels=5, pooling="pooler")
    ids = jax.random.randint(jax.random.key(0), (8, 12), 1, 64, jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[:, 9:].set(0),
             "token_type_ids": jnp.zeros_like(ids), "labels": jnp.arange(8, dtype=jnp.int32) % 5}
    params = model.init(jax.random.key(1), ids)["params"]
    spec = lr.LoraSpec(rank=4, alpha=8, targets=minilm_step.OURS_TARGETS["qv"],
                       trainable=r"classifier/.*")
    quant = lr.QuantSpec("nf4", 16, double_quant=False, targets=r"bert/encoder/.*")
    return model, params, batch, spec, quant


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_recipe_step_matches_the_lowrank_step(mode):
    from functools import partial

    from benchmarks.peers import recipe_step

    model, params, batch, spec, quant = _tiny_bert_problem()
    spec = None if mode == "full" else spec
    losses = {}
    for dropout in (False, True):
        forward = partial(ls.bert_forward, dropout=dropout, prng_name="hash")
        ours = ls.make_step(model, params, batch, forward, "classification", mode=mode,
                            spec=spec, quant=quant)
        recipe = recipe_step.make_recipe_step(model, params, batch, mode=mode, spec=spec,
                                              quant=quant, dropout=dropout, prng_name="hash")
        for step in (ours, recipe):
            step.run(), step.run()
            assert np.isfinite(step.losses).all() and step.losses[1] < step.losses[0] + 0.5
        assert recipe.trainable_params == ours.trainable_params
        losses[dropout] = ours.losses[0], recipe.losses[0]
    # Dropout off: the same math on the same params (the same seed, the same adapters).
    assert abs(losses[False][0] - losses[False][1]) < 1e-5
    # Dropout on: both paths run it, and it changes the loss.
    assert all(abs(a - b) > 1e-4 for a, b in zip(losses[True], losses[False], strict=True))


def test_recipe_step_in_bfloat16_runs():
    from benchmarks.peers import recipe_step

    model, params, batch, spec, quant = _tiny_bert_problem()
    step = recipe_step.make_recipe_step(model, params, batch, mode="lora", spec=spec,
                                        dropout=True, compute_dtype=jnp.bfloat16)
    step.run()
    assert np.isfinite(step.losses[0])
    with pytest.raises(ValueError, match="needs a LoraSpec"):
        recipe_step.make_recipe_step(model, params, batch, mode="lora")
