"""Faults and bad files: checkpoint and database files damaged at random, finished runs run
again, non-finite weights, and every error naming its file (kills: test_faults_kills.py).

Invariants checked on every trial: a resumed run's adapters equal an uninterrupted run's bit
for bit; no finished row is lost or doubled; every error names its file. The fast tier runs a
few seeds; ``-m slow`` runs many (the counts are in the README's Reliability section).
"""

import dataclasses
import importlib.util
import pathlib
import sqlite3
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import lowrank as lr
from lowrank import results
from lowrank import train as lt
from lowrank.train import checkpoint as ckpt_lib
from lowrank.train import toy

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FAST, SLOW = (0, 1), tuple(range(2, 22))
SEEDS = [*FAST, *(pytest.param(s, marks=pytest.mark.slow) for s in SLOW)]
TASK = dataclasses.replace(toy.classifier(ml_collections.ConfigDict({"batch_size": 16})),
                           eval_batches=None)
STEPS = 24


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


report = _module("faults_report", "experiments/report.py")
run = _module("faults_run", "experiments/run.py")


def train_config(workdir=None, steps=STEPS, **checkpoint):
    config = lt.default_config()
    config.steps, config.batch_size, config.quiet = steps, 16, True
    config.workdir = None if workdir is None else str(workdir)
    config.lora.rank, config.lora.targets, config.lora.dropout = 2, r"hidden_\d+/kernel", 0.1
    config.log.tensorboard, config.checkpoint.every = False, 4
    for key, value in checkpoint.items():
        config.checkpoint[key] = value
    return config


@pytest.fixture(scope="module")
def uninterrupted():
    return lt.train(train_config(), TASK).trainable


def same_leaves(a, b):
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def damage(file: pathlib.Path, rng: np.random.Generator) -> str:
    """Truncates ``file``, empties it, or overwrites a random stretch with random bytes."""
    data = bytearray(file.read_bytes())
    mode = ["truncate", "empty", "overwrite"][rng.integers(3)] if data else "overwrite"
    if mode == "truncate":
        data = data[:rng.integers(len(data))]
    elif mode == "empty":
        data = bytearray()
    else:
        start = int(rng.integers(max(len(data) - 8, 1)))
        length = int(rng.integers(8, 64))
        data[start:start + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    file.write_bytes(bytes(data))
    return mode


# ---- the results database: a finished run is counted once --------------------------------

def test_a_finished_row_is_written_once_unless_replaced(tmp_path):
    db = results.ResultsDB(tmp_path / "r.sqlite")
    config = {"lora": {"rank": 4}, "seed": 0}
    first = db.write(config, {"accuracy": 0.9}, experiment="e")
    db.write(config, {}, status="failed", experiment="e")  # failures may repeat
    db.write(config, {"accuracy": 0.5}, experiment="other")  # another experiment's run
    with pytest.raises(results.DuplicateRunError, match=f"finished run {first} for experiment"):
        db.write(config, {"accuracy": 0.8}, experiment="e")
    assert [r["metric.accuracy"] for r in db.rows()] == [0.9, 0.5]
    db.write(config, {"accuracy": 0.8}, experiment="e", replace=True)
    assert sorted(r["metric.accuracy"] for r in db.rows()) == [0.5, 0.8]
    with pytest.raises(sqlite3.IntegrityError):  # the index guards writers of any version
        db._conn.execute("INSERT INTO runs (config_hash, experiment, status, seed) "
                         "VALUES (?, 'e', 'ok', 0)", (results.config_hash(config),))


def test_report_leaves_out_the_repeated_rows_of_an_old_database(tmp_path, capsys):
    path = tmp_path / "old.sqlite"
    db = results.ResultsDB(path)
    config = {"method": "lora", "lora": {"rank": 8}, "adapt": "q", "seed": 0,
              "quant": {"fmt": "none"}}
    db.write(config, {"accuracy": 0.9}, experiment="rank_ablation", step_seconds=0.5,
             trainable_params=10, peak_memory_mb=1.0)
    db._conn.execute("DROP INDEX runs_one_ok_row")  # as written before the index existed
    db._conn.execute("INSERT INTO runs SELECT NULL, config_hash, experiment, status, seed, "
                     "trainable_params, base_params, bits_per_param, 0.0, peak_memory_mb, "
                     "wall_seconds, git_commit, finished_at, traceback, predictions, "
                     "\"config.method\", "
                     "\"config.lora.rank\", \"config.adapt\", \"config.seed\", "
                     "\"config.quant.fmt\", \"metric.accuracy\" FROM runs")
    db.close()
    frame = report.load_runs(path)
    assert "holds 1 repeated finished row(s)" in capsys.readouterr().err
    assert frame["id"].tolist() == [1] and len(results.ResultsDB(path).rows()) == 2
    assert report.rank_table(frame).rows == [["W_q", "–", "–", "90.0"]]  # one seed, no "± 0.0"
    assert report.method_table(frame, experiments=("rank_ablation",)).rows[0][2] == "0.50"


def toy_experiment(rank=2):
    from configs.common import base_config

    config = base_config("lowrank.train.toy:classifier")
    config.adapt, config.lora.targets, config.lora.rank = "custom", r"hidden_\d+/kernel", rank
    config.lora.trainable, config.steps, config.batch_size = r"head/.*", 3, 8
    config.lock()
    return config


def test_run_py_on_a_finished_run_writes_nothing_and_replaces_only_when_told(tmp_path):
    config, db_path, work = toy_experiment(), tmp_path / "r.sqlite", tmp_path / "runs"
    first = run.run(config, db_path=db_path, experiment="toy", workdir=str(work))
    with pytest.raises(results.DuplicateRunError, match="nothing run or written; --replace"):
        run.run(config, db_path=db_path, experiment="toy", workdir=str(work))
    (row,) = results.ResultsDB(db_path).rows(None)
    assert row["step_seconds"] == first["step_seconds"] > 0

    # Killed between its final checkpoint and its row (here: a new database), the rerun
    # trains no step: no step time (not 0), and the training loss of the run's log.
    resumed = run.run(config, db_path=tmp_path / "new.sqlite", experiment="toy",
                      workdir=str(work))
    assert resumed["step_seconds"] is None
    assert resumed["train_loss"] == first["train_loss"]
    assert resumed["accuracy"] == first["accuracy"]

    run.run(config, db_path=db_path, experiment="toy", workdir=str(work), replace=True)
    (again,) = results.ResultsDB(db_path).rows(None)
    assert again["id"] != row["id"] and again["metric.accuracy"] == row["metric.accuracy"]
    assert again["step_seconds"] > 0  # trained again from scratch
    hashed = work / "toy" / results.config_hash(config)
    assert (hashed.parent / f"{hashed.name}.replaced-1" / "checkpoints").is_dir()


# ---- non-finite weights are refused where they enter -------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_quantize_refuses_nonfinite_weights_naming_the_count(seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(64, 96)).astype(np.float32)
    where = [tuple(int(i) for i in rng.integers((64, 96))) for _ in range(rng.integers(1, 4))]
    for i, at in enumerate(where):
        w[at] = [np.nan, np.inf, -np.inf][i % 3]
    bad = int((~np.isfinite(w)).sum())
    first = min(where)
    for fmt in lr.quant.FORMATS:
        for dq in (False, True):
            with pytest.raises(ValueError, match=rf"has {bad} non-finite values of 6144 .*"
                               rf"first at index \({first[0]}, {first[1]}\)"):
                lr.quantize(w, fmt, 64, dq)
    for dq in (False, True):  # what the refusal prevents (the same in every format)
        kept = lr.quant.dequantize(lr.quantize(w, "nf4", 64, dq, allow_nonfinite=True))
        # an inf spreads NaN over its block (or array), a NaN is stored as a number
        assert not np.array_equal(np.isfinite(np.asarray(kept)), np.isfinite(w))
    params = {"fc": {"kernel": jnp.asarray(w)}}
    with pytest.raises(ValueError, match=f"has {bad} non-finite"):
        lr.quantize_tree(params)
    for init, quant in (("pissa", None), ("loftq", lr.QuantSpec())):
        with pytest.raises(ValueError, match=f"fc/kernel has {bad} non-finite .* {init}"):
            lr.init(jax.random.key(0), params, lr.LoraSpec(rank=2, init=init), quant=quant)
    frozen, _ = lr.init(jax.random.key(0), params, lr.LoraSpec(rank=2, init="pissa"),
                        allow_nonfinite=True)
    assert frozen["fc"]["kernel"].shape == (64, 96)


# ---- damaged checkpoints: named, set aside, the previous one used -------------------------

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run stopped at step 12 (checkpoints 4, 8, 12), copied afresh for each trial."""
    workdir = tmp_path_factory.mktemp("stopped")
    lt.train(train_config(workdir, steps=12), TASK)
    return workdir


def _copy(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def _damaged_copy(checkpointed, work, seed):
    """A copy of the stopped run with one random file of its newest step damaged: on odd
    seeds one that orbax reads (most files are commit markers and ocdbt pieces it merged)."""
    rng = np.random.default_rng(seed)
    _copy(checkpointed, work)
    files = sorted(p for p in (work / "checkpoints" / "12").rglob("*") if p.is_file())
    if seed % 2:
        files = [p for p in files if p.name != "commit_success.txt"
                 and "ocdbt.process_0" not in p.parts and p.name != "_CHECKPOINT_METADATA"]
    file = files[rng.integers(len(files))]
    return file, damage(file, rng)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_damaged_checkpoint_falls_back_and_resumes_bit_identical(
        seed, checkpointed, uninterrupted, tmp_path):
    file, how = _damaged_copy(checkpointed, tmp_path / "refuse", seed)
    try:  # refusing instead: it names the step and the file, and moves nothing
        lt.train(train_config(tmp_path / "refuse", steps=12, fallback=False), TASK)
        refused = None
    except ckpt_lib.DamagedCheckpoint as e:
        refused = e
        assert e.step == 12 and str(e.file) in str(e) and file.is_relative_to(e.file)
        assert (tmp_path / "refuse" / "checkpoints" / "12").is_dir()

    work = tmp_path / "resume"
    _damaged_copy(checkpointed, work, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = lt.train(train_config(work), TASK)
    moved = [str(w.message) for w in caught if "is damaged" in str(w.message)]
    if refused is not None:  # unreadable: set aside, resumed from the step before
        assert resumed.start_step == 8 and len(moved) == 1
        named = work / refused.file.relative_to(tmp_path / "refuse")  # the same file
        assert moved[0].startswith(f"checkpoint step 12 is damaged: cannot read {named} (")
        assert f"; moved it to {work}/checkpoints.damaged/12 and resuming from step 8" in moved[0]
        assert (work / "checkpoints.damaged" / "12").is_dir()  # kept, not deleted
    else:  # a file orbax does not need (commit markers, merged-away ocdbt pieces)
        assert resumed.start_step == 12 and not moved
    assert same_leaves(resumed.trainable, uninterrupted)
    print(f"fault: checkpoint file {file.relative_to(tmp_path / 'refuse')} {how}: resumed from "
          f"step {resumed.start_step}, bit-identical")


def test_a_run_killed_while_orbax_deleted_an_old_step_resumes(
        checkpointed, uninterrupted, tmp_path):
    """Found by the kill trials: keep=K makes orbax delete old steps; killed halfway through,
    the old step's folder lacks items, and must not stop the resume."""
    work = _copy(checkpointed, tmp_path / "run")
    for gone in ("config", "meta", "commit_success.txt", "_CHECKPOINT_METADATA"):
        subprocess.run(["rm", "-r", str(work / "checkpoints" / "4" / gone)], check=True)
    resumed = lt.train(train_config(work), TASK)
    assert resumed.start_step == 12 and same_leaves(resumed.trainable, uninterrupted)


# ---- every loader error names its file; command-line tools print one line ----------------

def test_damaged_files_are_named(tmp_path):
    from lowrank.interop import peft
    from lowrank.train import export

    export.export_adapters(tmp_path / "export", {"w": jnp.ones(2)})
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / peft.CONFIG_FILE).write_text('{"r": 2, "lora_alpha": ')
    with pytest.raises(ValueError, match=f"{tmp_path}/peft/{peft.CONFIG_FILE} is not valid"):
        peft.read_config(tmp_path / "peft")
    weights = tmp_path / "export" / export.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{weights} cannot be read as safetensors"):
        export.load_adapters(tmp_path / "export")
    (tmp_path / "export" / export.INDEX).write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=f"{tmp_path}/export/{export.INDEX} is not valid"):
        export.read_index(tmp_path / "export")
    for garbage in (b"SQLite format 3\x00" + bytes(200), b"not a database" * 100):
        path = tmp_path / f"r{len(garbage)}.sqlite"
        path.write_bytes(garbage)
        with pytest.raises(results.ResultsDBError, match=str(path)):
            results.ResultsDB(path).rows()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_damaged_database_is_refused_naming_it_or_read_whole(seed, tmp_path, capsys):
    path = tmp_path / "r.sqlite"
    db = results.ResultsDB(path)
    for i in range(30):
        db.write({"i": i, "seed": 0, "text": "x" * 200}, {"x": float(i)}, experiment="e")
    written = db.rows()
    db.close()
    files = sorted(tmp_path.glob("r.sqlite*"))
    file = files[np.random.default_rng(seed).integers(len(files))]
    how = damage(file, np.random.default_rng(seed))
    try:
        rows = results.ResultsDB(path).rows()
    except results.ResultsDBError as e:
        assert str(path) in str(e)
        with pytest.raises(SystemExit):
            report.main([f"--db={path}"])
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("report.py: error:") and str(path) in line
        print(f"fault: database file {file.name} {how}: refused, naming it")
    else:  # never a part of the rows: all of them, or (emptied: a new database) none
        assert rows == ([] if how == "empty" else written)
        print(f"fault: database file {file.name} {how}: {len(rows)} rows read")


def test_convert_refuses_an_existing_destination_and_errors_in_one_line(tmp_path, capsys):
    from lowrank.interop import convert

    dst = tmp_path / "peft"
    dst.mkdir()
    (dst / "adapters.json").write_text("{}")
    with pytest.raises(SystemExit):
        convert.main(["to-peft", str(tmp_path / "missing"), str(dst), "--base", "x"])
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{dst} already exists: pass --overwrite" in line
    assert (dst / "adapters.json").read_text() == "{}"
    with pytest.raises(SystemExit):
        convert.main(["to-peft", str(tmp_path / "missing"), str(dst), "--base", "x",
                      "--overwrite"])
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{tmp_path / 'missing' / 'adapters.json'} does not exist" in line
