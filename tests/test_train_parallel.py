"""jit, pmap and mesh runs on 4 host CPU devices agree with one device (in a subprocess: the
device count must be set before JAX starts)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, numpy as np
    from lowrank import paths, quant
    from lowrank import train as lt

    assert jax.device_count() == 4, jax.devices()
    out_dir = sys.argv[1]

    def config(mode, mesh_shape=(-1, 1), batch_size=16, micro_batches=1):
        c = lt.default_config()
        c.steps, c.batch_size, c.micro_batches, c.quiet = 3, batch_size, micro_batches, True
        c.lora.rank, c.lora.targets = 2, r"hidden_\d+/kernel"
        c.optimizer.learning_rate = 0.05
        c.parallel.mode, c.parallel.mesh_shape = mode, mesh_shape
        return c

    task = lt.load_task(config("jit"))
    # QLoRA: one frozen weight is 4-bit, so its codes and scales get sharded too
    params = dict(task.params)
    params["hidden_1"] = {**params["hidden_1"],
                          "kernel": quant.quantize(params["hidden_1"]["kernel"], "nf4", 64)}
    task = lt.Task(task.model, params, task.train_batch, task.loss)  # no eval: not compared

    runs = {"jit": config("jit"), "pmap": config("pmap"),
            "mesh_2x2_micro2": config("mesh", (2, 2), micro_batches=2),
            "mesh_1x4": config("mesh", (1, 4))}
    arrays, report = {}, {}
    for name, c in runs.items():
        result = lt.train(c, task)
        assert int(result.state.step) == 3
        for path, leaf in paths.flatten(jax.tree.map(np.asarray, result.trainable)).items():
            for part in ("a", "b"):
                arrays[f"{name}|{path}/{part}"] = np.asarray(getattr(leaf, part))

    runner = lt.mesh_runner(lambda s, f, b: (s, {}), lt.make_mesh((1, 4)))
    placed = runner.place_frozen(params)
    report["specs"] = {p: str(x.sharding.spec) for p, x in
                       zip(paths.tree_paths(placed), jax.tree.leaves(placed))}
    errors = {}
    for mode in ("pmap", "mesh"):
        try:
            lt.train(config(mode, batch_size=6), task)
        except ValueError as e:
            errors[mode] = str(e)
    report["errors"] = errors
    np.savez(out_dir + "/trainable.npz", **arrays)
    with open(out_dir + "/report.json", "w") as f:
        json.dump(report, f)
""")


def test_jit_pmap_and_mesh_agree_with_one_device_on_4_cpu_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(tmp_path / "trainable.npz", allow_pickle=False) as npz:
        arrays = dict(npz)
    report = json.loads((tmp_path / "report.json").read_text())

    reference = {k.split("|")[1]: v for k, v in arrays.items() if k.startswith("jit|")}
    assert sorted(reference) == ["hidden_0/kernel/a", "hidden_0/kernel/b", "hidden_1/kernel/a",
                                 "hidden_1/kernel/b"]
    assert max(np.abs(v).max() for k, v in reference.items() if k.endswith("/b")) > 1e-3
    for mode in ("pmap", "mesh_2x2_micro2", "mesh_1x4"):
        for path, ref in reference.items():
            np.testing.assert_allclose(arrays[f"{mode}|{path}"], ref, atol=1e-5, rtol=0,
                                       err_msg=f"{mode} {path}")

    specs = report["specs"]
    assert specs["hidden_0/kernel"] == "P(None, 'fsdp')"  # [16, 32]: the 32 axis
    assert specs["hidden_1/kernel/codes"] == "P('fsdp',)"  # packed nf4 codes [512]
    assert specs["hidden_1/kernel/absmax"] == "P('fsdp',)"  # 16 block scales
    assert specs["head/kernel"] == "P('fsdp',)"  # [32, 8]: the larger axis

    errors = report["errors"]
    for mode in ("pmap", "mesh"):
        assert "config.batch_size 6 does not split over 4 devices" in errors[mode], errors
        assert "use a multiple of 4" in errors[mode]


def test_a_leaf_is_split_along_its_largest_evenly_dividing_axis():
    from lowrank.train.parallel import fsdp_spec

    assert fsdp_spec((8, 12), 4) == fsdp_spec((2, 12), 4)  # the 12 axis, wherever it lies
    assert str(fsdp_spec((8, 12), 4)) == "P(None, 'fsdp')"
    assert str(fsdp_spec((12, 6), 4)) == "P('fsdp',)"
    assert str(fsdp_spec((6, 3), 4)) == "P()"  # nothing divides: replicated
    assert str(fsdp_spec((6, 8), 1)) == "P()"  # no fsdp axis to split over
