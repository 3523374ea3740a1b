"""Tests of the benchmark helpers: the step under test, FLOP counts, the worker protocol, and
smoke runs of the scaling and GPU scripts at tiny sizes (slow tier).

    .venv/bin/python -m pytest -q tests/test_benchmarks_peers.py
"""

from __future__ import annotations

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
