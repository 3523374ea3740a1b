"""Source of notebooks/04_results.ipynb (python notebooks/build.py)."""
# %% [md]
# # Results: the sweeps' database, pivoted and plotted
#
# Every run of `experiments/sweep.py` writes one row to a results database (SQLite): each
# config field flattened into a `config.*` column, the evaluation metrics as `metric.*`, and
# its cost (trainable parameters, seconds per step, peak memory) and provenance (seed, git
# commit, config hash). `experiments/report.py` turns those rows into the committed tables;
# this notebook loads the same rows so you can slice them your own way.
#
# The rows come from `$LOWRANK_RESULTS` when set (a `.sqlite` database, such as the sweeps'
# default `workdir/results.sqlite`, or a `.csv` export), else from the committed export
# `experiments/results/runs.csv`. With `LOWRANK_RESULTS=tiny`, or in a checkout without the
# export, four runs of the tiny sweeps (a tiny random BERT) fill a temporary database first.

# %%
import os
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

SMALL = os.environ.get("LOWRANK_NOTEBOOK_SMALL", "0") not in ("", "0")
# The repository root: experiments/ and configs/ are scripts and configs, not installed.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "experiments").is_dir())
sys.path.insert(0, str(ROOT))

from configs import common  # noqa: E402
from experiments import report  # noqa: E402
from experiments import run as experiment_run  # noqa: E402
from lowrank import results  # noqa: E402

print(f"small mode: {SMALL} (reading a table is fast in either mode)")

# %% [md]
# ## 1. Loading the rows
#
# `report.load_runs` reads a database or its CSV export and keeps the finished runs.

# %%
def tiny_database() -> Path:
    """The first and last runs of the tiny rank and quantization sweeps (a tiny random BERT,
    a few steps), in a temporary database."""
    experiment_run.enable_compilation_cache()  # a second time, the runs skip compiling
    path = Path(tempfile.mkdtemp()) / "results.sqlite"
    for experiment in ("rank_ablation", "quant_ablation"):
        module, config = common.load(str(ROOT / "configs" / f"{experiment}.py:tiny"))
        sweep = module.get_sweep(config)
        for overrides in (sweep[0], sweep[-1]):
            experiment_run.run(results.apply_overrides(config, overrides), db_path=path,
                               experiment=experiment)
    return path


COMMITTED = ROOT / "experiments" / "results" / "runs.csv"
wanted = os.environ.get("LOWRANK_RESULTS", "")
if wanted == "tiny" or not (wanted or COMMITTED.is_file()):
    print("running four tiny runs into a temporary database"
          + ("" if wanted else f" ({COMMITTED} is not there: experiments/results/reproduce.sh)"))
    source = tiny_database()
else:
    source = Path(wanted or COMMITTED)
    if not source.is_file():
        raise FileNotFoundError(f"LOWRANK_RESULTS={wanted} is not a file: point it at a "
                                "results database (.sqlite) or its CSV export, or say 'tiny'")
frame = report.load_runs(source)
print(f"{len(frame)} finished runs from {source}")
display(frame.groupby("experiment").agg(runs=("id", "size"), seeds=("seed", "nunique")))
display(frame[["experiment", "config.method", "config.adapt", "config.lora.rank",
               "config.quant.fmt", "seed", "metric.accuracy", "trainable_params",
               "step_seconds"]].head())

# %% [md]
# ## 2. Rank and target ablation (the LoRA paper's Tables 5 and 6)
#
# A pivot of test accuracy by the weights LoRA adapts and its rank, averaged over seeds; then
# accuracy against the number of trained parameters, where the baselines (full fine-tuning,
# the classifier head alone) are single points.

# %%
ranks = frame[frame["experiment"] == "rank_ablation"]
ranks = report.tuning.tuned(ranks)  # each setting at the learning rate chosen on validation
lora = ranks[ranks["config.method"] == "lora"]
accuracy = lora.pivot_table(index="config.adapt", columns="config.lora.rank",
                            values="metric.accuracy", aggfunc="mean")
accuracy = accuracy.reindex([a for a in report.ADAPT_NAMES if a in accuracy.index])
display((100 * accuracy).rename(index=report.ADAPT_NAMES).round(1))

fig, ax = plt.subplots(figsize=(6, 3.5))
std = lambda x: x.std(ddof=1) if len(x) > 1 else 0.0  # noqa: E731 (one seed: no bar)
for adapt, runs in lora.groupby("config.adapt"):
    stats = runs.groupby("trainable_params")["metric.accuracy"].agg(["mean", std])
    ax.errorbar(stats.index, 100 * stats["mean"], yerr=100 * stats.iloc[:, 1], marker="o",
                capsize=3, label=report.ADAPT_NAMES[adapt])
for (method, name), color in zip(report.BASELINE_NAMES.items(), ("black", "gray"), strict=True):
    runs = ranks[ranks["config.method"] == method]
    if not runs.empty:
        ax.errorbar(runs["trainable_params"].mean(), 100 * runs["metric.accuracy"].mean(),
                    yerr=100 * std(runs["metric.accuracy"]), marker="*", markersize=12,
                    capsize=3, color=color, zorder=3, label=name)
ax.set(xscale="log", xlabel="trainable parameters", ylabel="test accuracy (%)",
       title="Accuracy per trained parameter (bars: ± std over seeds)")
ax.legend(fontsize=8)
plt.show()

# %% [md]
# ## 3. Quantized bases (QLoRA's data-type comparison)
#
# The same LoRA over a frozen base stored in each data type: what it costs in bits, how far the
# stored weights are from the originals, and what that does to accuracy.

# %%
quant = frame[frame["experiment"] == "quant_ablation"].copy()
quant["data type"] = quant.apply(report.data_type, axis=1)
by_type = quant.groupby("data type")[["metric.quant_bits_per_param", "metric.weight_rmse",
                                      "metric.accuracy"]].mean()
by_type = by_type.reindex([d for d in report.DATA_TYPES if d in by_type.index])
display(by_type)

spread = quant.groupby("data type")["metric.accuracy"].agg(
    lambda x: x.std(ddof=1) if len(x) > 1 else 0.0).reindex(by_type.index)
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(by_type.index, 100 * by_type["metric.accuracy"], yerr=100 * spread, capsize=4,
       color="C0")
ax.set(ylabel="test accuracy (%)",
       title="LoRA over a base stored in each data type (bars: ± std over seeds)",
       ylim=(max(0, 100 * by_type["metric.accuracy"].min() - 10), 100))
plt.show()

# %% [md]
# ## 4. The report's tables
#
# The tables `experiments/report.py` commits, made by the same functions from these rows.

# %%
for _, table in report.report(frame):
    display(Markdown(report.to_markdown(table)))
