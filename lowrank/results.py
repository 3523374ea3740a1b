"""The results database: one row per run (its flattened config, metrics, costs and provenance).

SQLite by default (one file, safe for a sweep killed at any moment: each row is one
transaction). Config and metric columns are added as new names appear, so a row holds every
hyper-parameter as its own column (``config.lora.rank``, ``metric.accuracy``).

>>> db = ResultsDB(":memory:")
>>> config = {"lora": {"rank": 8}, "seed": 0}
>>> db.write(config, {"accuracy": 0.9}, experiment="demo")
1
>>> db.finished_hashes() == {config_hash(config)}
True
>>> float(db.frame()["metric.accuracy"][0])
0.9
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

STATUSES = ("ok", "failed")
CONFIG_PREFIX, METRIC_PREFIX = "config.", "metric."
# Fields that say where and how loudly a run happens, not what it computes: never hashed.
# ``sweep.*`` fields describe the grid a run belongs to, not the run.
UNHASHED = ("workdir", "quiet", "log.every", "log.tensorboard", "checkpoint.every",
            "checkpoint.keep", "checkpoint.resume", "checkpoint.fallback", "export_adapters",
            "sweep.", "distributed.", "pretrain.eval_every")
# Fields added after results were recorded, left out of the hash while they hold the value
# that computes what runs did before them, so recorded runs keep their hashes.
HASHED_UNLESS_DEFAULT = {
    "lora.method": "lora",
    # AdaLoRA's budget (lowrank.train.default_config's; tests/test_adalora.py checks they agree)
    "lora.adalora.target_rank": 4, "lora.adalora.tinit": 0, "lora.adalora.tfinal": 0,
    "lora.adalora.delta_t": 1, "lora.adalora.beta1": 0.85, "lora.adalora.beta2": 0.85,
    "lora.adalora.orth_reg_weight": 0.5,
    # model selection on validation and per-group learning rates (the results protocol)
    "eval.select": None, "optimizer.lr_multipliers": [],
    # the dropout masks' generator (no committed run uses dropout, so their bits never mattered)
    "dropout_prng": "hash",
    # the BBC task's model dropout in training (configs/finetune_bbc.py; off in every committed run)
    "model.dropout": False,
    # the LM task's pretraining corpus (configs/lm_domain.py; "python_tree" for the LM study)
    "data.pretrain_domain": "python",
}

_FIXED_COLUMNS = {
    "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "config_hash": "TEXT NOT NULL",
    "experiment": "TEXT",
    "status": "TEXT NOT NULL",
    "seed": "INTEGER",
    "trainable_params": "INTEGER",
    "base_params": "INTEGER",
    "bits_per_param": "REAL",
    "step_seconds": "REAL",
    "peak_memory_mb": "REAL",
    "wall_seconds": "REAL",
    "git_commit": "TEXT",
    "finished_at": "TEXT",
    "traceback": "TEXT",
    "predictions": "TEXT",  # JSON: per-example test scores (lowrank.train.selection)
}
# A finished run is one (experiment, config hash, seed): at most one "ok" row each. NULLs
# are coalesced because SQLite's unique indexes treat every NULL as distinct.
_RUN_KEY = ("experiment", "config_hash", "seed")
_UNIQUE_OK = ("CREATE UNIQUE INDEX IF NOT EXISTS runs_one_ok_row ON runs "
              "(COALESCE(experiment, ''), config_hash, COALESCE(seed, -1)) WHERE status = 'ok'")


class ResultsDBError(Exception):
    """The results database file cannot be read or written (damaged, or not a database)."""


class DuplicateRunError(ValueError):
    """A finished row for this (experiment, config hash, seed) is already in the database."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (a ConfigDict's ``to_dict()``) as ``{"a.b": value}``; tuples and lists
    stay values.

    >>> flatten({"lora": {"rank": 8, "targets": "q"}, "seed": 0})
    {'lora.rank': 8, 'lora.targets': 'q', 'seed': 0}
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def unhashed(name: str) -> bool:
    """Whether the flattened config field ``name`` is one :data:`UNHASHED` leaves out of the
    hash (it does not change what a run computes).

    >>> unhashed("sweep.learning_rates.lora"), unhashed("workdir"), unhashed("lora.rank")
    (True, True, False)
    """
    return any(name == u or (u.endswith(".") and name.startswith(u)) for u in UNHASHED)


def config_hash(config: Any) -> str:
    """SHA-256 (16 hex digits) of the config's flattened fields, except those in ``UNHASHED``
    (workdir, logging, checkpointing): two runs with the same hash compute the same thing.
    Tuples hash like lists, so a config that went through JSON keeps its hash.

    >>> config_hash({"seed": 0, "workdir": "/a"}) == config_hash({"seed": 0, "workdir": "/b"})
    True
    >>> config_hash({"seed": 0}) == config_hash({"seed": 1})
    False
    >>> config_hash({"lora": {"method": "lora"}}) == config_hash({"lora": {}})
    True
    """
    flat_missing = object()
    flat = {k: _jsonable(v) for k, v in flatten(_plain(config)).items()
            if not unhashed(k)
            and _jsonable(HASHED_UNLESS_DEFAULT.get(k, flat_missing)) != _jsonable(v)}
    text = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of the ConfigDict ``config`` with ``{"a.b": value}`` set; an unknown key is a
    KeyError that lists every valid key.

    >>> import ml_collections
    >>> c = ml_collections.ConfigDict({"lora": {"rank": 8}})
    >>> apply_overrides(c, {"lora.rank": 2}).lora.rank
    2
    >>> apply_overrides(c, {"lora.rnak": 2})
    Traceback (most recent call last):
    ...
    KeyError: "unknown config key 'lora.rnak'; valid keys: lora.rank"
    """
    config = config.copy_and_resolve_references()
    valid = flatten(config.to_dict())
    for key, value in overrides.items():
        if key not in valid:
            raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(valid))}")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        # Tuple fields (rank_pattern...) accept any sequence; a list from JSON becomes a tuple.
        with node.ignore_type() if isinstance(value, tuple | list) else nullcontext():
            node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def _sql_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return int(value) if isinstance(value, bool) else value
    return json.dumps(_jsonable(value), default=str)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ResultsDB:
    """An SQLite table ``runs`` of finished (and failed) runs.

    Args:
      path: the database file (created with its folder), or ":memory:".

    >>> db = ResultsDB(":memory:")
    >>> db.write({"seed": 1}, {}, status="failed", traceback="Boom")
    1
    >>> db.finished_hashes()
    set()
    """

    def __init__(self, path: str | Path):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        with self._named():
            # isolation_level=None: every statement commits on its own, so a killed sweep
            # keeps every row it wrote and never a half-written one.
            self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
                # A damaged file can still read, rows silently missing: refuse it instead
                # (tens of ms for tens of thousands of rows).
                (verdict,) = self._conn.execute("PRAGMA integrity_check(1)").fetchone()
                if verdict != "ok":
                    raise sqlite3.DatabaseError(f"integrity check failed: {verdict}")
            cols = ", ".join(f"{_quote(k)} {t}" for k, t in _FIXED_COLUMNS.items())
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            try:
                self._conn.execute(_UNIQUE_OK)
            except (sqlite3.IntegrityError, sqlite3.OperationalError):
                pass  # an old database with duplicates, or read-only: write() still checks

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """Re-raises SQLite's errors about the file ("database disk image is malformed", "file
        is not a database") with the file's path."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # text bytes damaged too
            raise ResultsDBError(f"cannot use the results database {self.path}: {e}") from None

    def close(self) -> None:
        self._conn.close()

    def columns(self) -> list[str]:
        """The column names of ``runs``, in table order."""
        with self._named():
            return [row[1] for row in self._conn.execute("PRAGMA table_info(runs)")]

    def finished_row(self, config: Any, experiment: str | None = None) -> dict | None:
        """The finished ("ok") row of ``config`` in ``experiment``, or None.

        >>> db = ResultsDB(":memory:")
        >>> db.finished_row({"seed": 0}) is None
        True
        >>> db.write({"seed": 0}, {})
        1
        >>> db.finished_row({"seed": 0})["id"]
        1
        """
        plain = _plain(config)
        found = self._finished(experiment, config_hash(plain), plain.get("seed"))
        return found[0] if found else None

    def _finished(self, experiment: str | None, hash_: str, seed: Any) -> list[dict]:
        sql = ("SELECT * FROM runs WHERE status = 'ok' AND experiment IS ? AND config_hash = ? "
               "AND seed IS ? ORDER BY id")
        with self._named():
            cur = self._conn.execute(sql, (experiment, hash_, _sql_value(seed)))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur]

    def write(
        self,
        config: Any,
        metrics: Mapping[str, Any],
        *,
        status: str = "ok",
        experiment: str | None = None,
        traceback: str | None = None,
        replace: bool = False,
        **fields: Any,
    ) -> int:
        """Writes one run and returns its row id.

        A finished ("ok") run is written once: a second "ok" row for the same experiment,
        config hash and seed raises ``DuplicateRunError`` (naming the row it would double)
        unless ``replace``, which deletes the old row in the same transaction.

        Args:
          config: the run's config (ConfigDict or nested dict); its hash and every flattened
            field are stored.
          metrics: ``{name: number}``, stored as ``metric.<name>``.
          status: "ok" or "failed".
          experiment: a name to group runs by (the config file's stem).
          traceback: the error of a failed run.
          replace: replace a finished row of the same run instead of refusing.
          **fields: any of the fixed columns (trainable_params, bits_per_param,
            step_seconds, peak_memory_mb, wall_seconds, git_commit, base_params,
            predictions).
        """
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        unknown = set(fields) - set(_FIXED_COLUMNS)
        if unknown:
            raise ValueError(f"unknown result fields {sorted(unknown)}; accepted: "
                             f"{sorted(set(_FIXED_COLUMNS) - {'id'})}")
        plain = _plain(config)
        row: dict[str, Any] = {
            "config_hash": config_hash(plain), "experiment": experiment, "status": status,
            "seed": plain.get("seed"), "traceback": traceback,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields,
        }
        row.update({CONFIG_PREFIX + k: v for k, v in flatten(plain).items()})
        row.update({METRIC_PREFIX + k: v for k, v in metrics.items()})
        with self._named():
            return self._insert(row, replace)

    def _insert(self, row: dict[str, Any], replace: bool) -> int:
        self._conn.execute("BEGIN IMMEDIATE")  # one writer at a time adds columns and the row
        try:
            if row["status"] == "ok":
                old = [r["id"] for r in self._finished(*(row[k] for k in _RUN_KEY))]
                if old and not replace:
                    raise DuplicateRunError(
                        f"{self.path} already holds finished run {old[0]} for experiment "
                        f"{row['experiment']!r}, config hash {row['config_hash']}, seed "
                        f"{row['seed']}: not written twice (replace=True replaces it)")
                self._conn.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in old])
            have = set(self.columns())
            for name in row:
                if name not in have:
                    self._conn.execute(f"ALTER TABLE runs ADD COLUMN {_quote(name)}")
            names = ", ".join(_quote(n) for n in row)
            marks = ", ".join("?" for _ in row)
            cur = self._conn.execute(f"INSERT INTO runs ({names}) VALUES ({marks})",
                                     [_sql_value(v) for v in row.values()])
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return int(cur.lastrowid)

    def finished_hashes(self, experiment: str | None = None) -> set[str]:
        """Config hashes of the runs that finished ("ok"), optionally of one experiment."""
        sql, args = "SELECT config_hash FROM runs WHERE status = 'ok'", ()
        if experiment is not None:
            sql, args = sql + " AND experiment = ?", (experiment,)
        with self._named():
            return {row[0] for row in self._conn.execute(sql, args)}

    def rows(self, status: str | None = "ok") -> list[dict[str, Any]]:
        """Every run (of ``status``; None: all) as a dict of column -> value, in id order."""
        sql, args = "SELECT * FROM runs", ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        with self._named():
            cur = self._conn.execute(sql + " ORDER BY id", args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur]

    def frame(self, status: str | None = "ok"):
        """The runs as a pandas DataFrame (one column per config field and metric).

        >>> ResultsDB(":memory:").frame().empty
        True
        """
        import pandas as pd

        return pd.DataFrame(self.rows(status), columns=self.columns())

    def export_csv(self, path: str | Path, status: str | None = None) -> int:
        """Writes every run (of ``status``; None: all) to a CSV file; returns the row count."""
        frame = self.frame(status)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        return len(frame)


def drop_duplicate_runs(frame):
    """``(frame without repeated finished runs, ids of the rows dropped)``: of the "ok" rows
    sharing an experiment, config hash and seed (written by older versions, which let a
    finished run be rerun), the first is kept, the one that trained.

    >>> import pandas as pd
    >>> frame = pd.DataFrame({"id": [1, 2, 3], "experiment": ["e"] * 3, "status": ["ok"] * 3,
    ...                       "config_hash": ["h", "h", "g"], "seed": [0, 0, 0]})
    >>> kept, dropped = drop_duplicate_runs(frame)
    >>> kept["id"].tolist(), dropped
    ([1, 3], [2])
    """
    if frame.empty or not set(_RUN_KEY) | {"status"} <= set(frame.columns):
        return frame, []
    key = frame[list(_RUN_KEY)].astype(str)  # NaN and None compare equal as text
    repeated = frame["status"].eq("ok") & key[frame["status"].eq("ok")].duplicated()
    repeated = repeated.reindex(frame.index, fill_value=False)
    dropped = [int(i) for i in frame.loc[repeated, "id"]] if "id" in frame else []
    return frame[~repeated].reset_index(drop=True), dropped


def read_runs(paths: Iterable[str | Path], status: str | None = "ok"):
    """The runs of several databases in one DataFrame.

    >>> read_runs([]).empty
    True
    """
    import pandas as pd

    frames = []
    for p in paths:
        db = ResultsDB(p)
        try:
            frames.append(db.frame(status))
        finally:
            db.close()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
