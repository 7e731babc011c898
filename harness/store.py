"""Results store: one SQLite file holding every evaluation, its per-image records, its
aggregate metrics and the provenance needed to reproduce it.

Location: the path given to ResultsStore, else $HARNESS_STORE, else ./results/store.sqlite.

Safety: the file runs in WAL mode with a busy timeout, and every write is a single
BEGIN IMMEDIATE ... COMMIT transaction. Several processes (parallel evaluations) can write at
once - they queue on the write lock instead of failing with "database is locked" - and a
process killed mid-write leaves the store exactly as of its last commit. synchronous=NORMAL:
in WAL mode this never corrupts the file; a power cut may drop only the latest commits, which
a resumed evaluation redoes. WAL needs a local filesystem (not NFS).

Schema (version 1):

  schema_version(version INTEGER)            one row; lets later code migrate old files
  evaluations(
    id INTEGER PRIMARY KEY, created TEXT (UTC ISO),
    suite TEXT, suite_version TEXT,          benchmark name and its version
    backbone TEXT, method TEXT, run TEXT, step INTEGER,   what was trained, how, which step
    checkpoint TEXT, checkpoint_hash TEXT,   path or hub id, and provenance.checkpoint_hash of it
    seed INTEGER,                            evaluation seed
    protocol_json TEXT,                      sampler settings, seeds, resolution, images per prompt
    provenance_json TEXT,                    provenance.collect(): versions, git commit, host, ...
    status TEXT                              'running' until finish_evaluation, then 'complete')
  records(evaluation_id, key TEXT, evaluator TEXT, record_json TEXT,
          PRIMARY KEY(evaluation_id, key, evaluator))
      one row per scored image; key is e.g. "<prompt id>/<image index>"
  metrics(evaluation_id, evaluator TEXT, name TEXT, value REAL, scale TEXT,
          higher_is_better INTEGER, version TEXT, PRIMARY KEY(evaluation_id, evaluator, name))
      aggregate numbers; value is a finite float, scale says its unit (e.g. "fraction", "percent")

Resuming: begin_evaluation returns the newest 'running' evaluation with the same suite,
suite_version, checkpoint_hash, seed and protocol, so an interrupted run continues where it
stopped (existing_keys tells it which images are done). A 'complete' evaluation is frozen.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import time
import urllib.parse
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from harness import provenance as provenance_lib

SCHEMA_VERSION = 2        # 2: metrics carry their standard error and sample count (1: without; read as NULL,
READABLE_VERSIONS = (1, 2)  #    upgraded in place when opened for writing)
DEFAULT_STORE = Path("results") / "store.sqlite"
BUSY_TIMEOUT_S = 120.0  # how long a writer waits for another writer's transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    suite TEXT NOT NULL,
    suite_version TEXT NOT NULL,
    backbone TEXT,
    method TEXT,
    run TEXT,
    step INTEGER,
    checkpoint TEXT,
    checkpoint_hash TEXT NOT NULL,
    seed INTEGER NOT NULL,
    protocol_json TEXT NOT NULL,
    provenance_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'complete'))
);
CREATE INDEX IF NOT EXISTS evaluations_identity
    ON evaluations (suite, suite_version, checkpoint_hash, seed, status);
CREATE TABLE IF NOT EXISTS records (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    evaluator TEXT NOT NULL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (evaluation_id, key, evaluator)
);
CREATE TABLE IF NOT EXISTS metrics (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    evaluator TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    scale TEXT NOT NULL,
    higher_is_better INTEGER NOT NULL,
    version TEXT NOT NULL,
    stderr REAL,
    n INTEGER,
    PRIMARY KEY (evaluation_id, evaluator, name)
);
"""

EVALUATION_COLUMNS = (
    "id", "created", "suite", "suite_version", "backbone", "method", "run", "step",
    "checkpoint", "checkpoint_hash", "seed", "protocol_json", "provenance_json", "status",
)
METRIC_FIELDS = ("name", "value", "scale", "higher_is_better", "version")   # required; stderr and n optional


def default_store_path() -> Path:
    return Path(os.environ.get("HARNESS_STORE") or DEFAULT_STORE)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and arrays show up in records; store them as plain numbers / lists.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} as JSON: {obj!r}")


def _to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


class StoreError(ValueError):
    """A store file that cannot be used as asked: named, with what to do, and nothing in it touched."""


def _sqlite_problem(path: Path, e: sqlite3.Error) -> StoreError:
    text = str(e)
    if "readonly" in text or "read-only" in text:
        return StoreError(f"results store {path} cannot be written (read-only file or folder); "
                          "pass a writable --store or set $HARNESS_STORE")
    if "not a database" in text or "malformed" in text or "disk image" in text:
        return StoreError(f"results store {path} is not a readable SQLite file ({text}: truncated or corrupt?); "
                          "restore it from a copy or pass another --store")
    return StoreError(f"results store {path} cannot be opened ({text}); pass another --store")


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise StoreError(f"results store {path} is a folder; pass the store file (e.g. {path / 'store.sqlite'})")


def _check_harness_tables(conn: sqlite3.Connection, path: Path) -> bool:
    """True when the file holds a harness store, False when it is empty; a foreign database is refused."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return False
    if "schema_version" not in tables or "evaluations" not in tables:
        raise StoreError(f"{path} is a SQLite database but not a harness results store (tables: "
                         f"{', '.join(sorted(tables)[:6])}); it was left untouched; pass another --store")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None or row[0] not in READABLE_VERSIONS:
        raise StoreError(f"results store {path} has schema version {row[0] if row else None}, this harness reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}; use a matching harness or a new store path")
    return True


def _schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])


def _connect(path: Path) -> sqlite3.Connection:
    _check_path(path)
    existed = path.exists() and path.stat().st_size > 0
    if existed:      # look before writing anything: a foreign or corrupt file must stay as it is
        _connect_readonly(path).close()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"results store {path}: cannot create its folder ({e.strerror}); pass another --store") from None
    try:
        return _connect_writable(path)
    except sqlite3.Error as e:
        raise _sqlite_problem(path, e) from None


def _connect_writable(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write opens BEGIN IMMEDIATE itself.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    # Switching to WAL needs a moment of exclusive access; when another process is creating the
    # same file it can report "locked" without waiting, so retry briefly.
    for attempt in range(100):
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 99:
                raise
            time.sleep(0.05)
    if mode.lower() != "wal":
        raise StoreError(f"results store {path}: could not enable WAL mode (got {mode!r}); "
                         "put the store on a local filesystem")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write (mode=ro). Where even that needs a write beside the file (a WAL store in a
    read-only folder cannot get its shared-memory file), the file is opened as immutable: nothing writes it then."""
    _check_path(path)
    if not path.is_file():
        raise StoreError(f"results store {path} does not exist; pass --store PATH or set $HARNESS_STORE")
    uri = "file:" + urllib.parse.quote(str(path.resolve()))
    last: sqlite3.Error | None = None
    for flags in ("?mode=ro", "?mode=ro&immutable=1"):
        try:
            conn = sqlite3.connect(uri + flags, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only = ON")
            _check_harness_tables(conn, path)
            return conn
        except sqlite3.Error as e:
            last = e
    raise _sqlite_problem(path, last)


def _parse_evaluation(row: sqlite3.Row) -> dict:
    out = {k: row[k] for k in EVALUATION_COLUMNS}
    out["protocol"] = json.loads(out.pop("protocol_json"))
    out["provenance"] = json.loads(out.pop("provenance_json"))
    return out


def _check_metric(metric: dict) -> tuple:
    missing = [f for f in METRIC_FIELDS if f not in metric]
    if missing:
        raise ValueError(f"metric {metric.get('name', metric)!r} is missing fields {missing}; "
                         f"each metric needs {list(METRIC_FIELDS)}")
    name = metric["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric name must be a non-empty string, got {name!r}")
    try:
        value = float(metric["value"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {name!r}: value {metric['value']!r} is not a number") from e
    if math.isnan(value):
        raise ValueError(f"metric {name!r} is NaN; fix the evaluator instead of storing it")
    if math.isinf(value):
        raise ValueError(f"metric {name!r} is infinite ({value}); fix the evaluator instead of storing it")
    stderr, n = metric.get("stderr"), metric.get("n")
    if stderr is not None and not (math.isfinite(float(stderr)) and float(stderr) >= 0):
        raise ValueError(f"metric {name!r}: stderr {stderr!r} must be a finite number >= 0 or None")
    if n is not None and (int(n) != n or int(n) < 0):
        raise ValueError(f"metric {name!r}: n {n!r} must be a whole number >= 0 or None")
    return (name, value, str(metric["scale"]), int(bool(metric["higher_is_better"])), str(metric["version"]),
            None if stderr is None else float(stderr), None if n is None else int(n))


class ResultsStore:
    """One connection to the store file. Use one per process (or thread); close() when done."""

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False):
        """readonly: open for reading only (leaderboards, reports): the file is never changed, a file that is
        not a harness store is refused, and a store in a read-only folder can still be read."""
        self.path = Path(path) if path is not None else default_store_path()
        self.readonly = readonly
        if readonly:
            self.conn = _connect_readonly(self.path)
            return
        self.conn = _connect(self.path)
        try:
            self._init_schema()
        except sqlite3.Error as e:
            self.conn.close()
            raise _sqlite_problem(self.path, e) from None
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it."""
        self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now (waits up to the busy timeout)
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def _init_schema(self) -> None:
        if _check_harness_tables(self.conn, self.path):
            if _schema_version(self.conn) == 1:   # add the metrics' stderr and n columns, in one transaction
                with self._write() as c:
                    if _schema_version(c) == 1:
                        c.execute("ALTER TABLE metrics ADD COLUMN stderr REAL")
                        c.execute("ALTER TABLE metrics ADD COLUMN n INTEGER")
                        c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            return                               # an existing store: nothing to create
        with self._write() as c:
            # statement by statement: executescript() would commit in the middle of the transaction
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            row = c.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(
                    f"results store {self.path} has schema version {row[0]}, this harness reads "
                    f"version {SCHEMA_VERSION}; use a matching harness or a new store path")

    # ---- evaluations ------------------------------------------------------------------------

    @contextmanager
    def evaluation_lock(self, suite: str, suite_version: str, checkpoint_hash: str, seed: int,
                        protocol: dict) -> Iterator[None]:
        """Held by the one process that draws and scores an evaluation of this identity. A second process
        (another terminal, a training run's checkpoint scoring) waits here, then finds the evaluation finished
        and returns it, instead of redoing the work and failing at the end. The lock is an flock on a file in
        <store>.locks/, released by the OS when its holder dies."""
        import fcntl
        import hashlib
        identity = _to_json({"suite": suite, "version": suite_version, "checkpoint_hash": checkpoint_hash,
                             "seed": int(seed), "protocol": protocol})
        folder = self.path.with_name(self.path.name + ".locks")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"another process is evaluating {suite} v{suite_version} on checkpoint {checkpoint_hash[:12]} "
                      f"into {self.path}; waiting for it", file=sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def begin_evaluation(
        self,
        suite: str,
        suite_version: str,
        checkpoint: str,
        seed: int,
        protocol: dict,
        *,
        checkpoint_hash: str | None = None,
        backbone: str | None = None,
        method: str | None = None,
        run: str | None = None,
        step: int | None = None,
        provenance: dict | None = None,
        resume: bool = True,
    ) -> int:
        """Start an evaluation (or, with resume, return the unfinished one with the same suite,
        suite_version, checkpoint_hash, seed and protocol) and return its id.
        checkpoint_hash defaults to provenance.checkpoint_hash(checkpoint); pass it for hub ids."""
        if checkpoint_hash is None:
            checkpoint_hash = provenance_lib.checkpoint_hash(checkpoint)
        protocol_json = _to_json(protocol)
        if provenance is None:
            provenance = provenance_lib.collect()
        with self._write() as c:
            if resume:
                row = c.execute(
                    "SELECT id FROM evaluations WHERE suite = ? AND suite_version = ? AND "
                    "checkpoint_hash = ? AND seed = ? AND protocol_json = ? AND status = 'running' "
                    "ORDER BY id DESC LIMIT 1",
                    (suite, suite_version, checkpoint_hash, int(seed), protocol_json),
                ).fetchone()
                if row is not None:
                    return int(row[0])
            cur = c.execute(
                "INSERT INTO evaluations (created, suite, suite_version, backbone, method, run, step, "
                "checkpoint, checkpoint_hash, seed, protocol_json, provenance_json, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                (_now(), suite, suite_version, backbone, method, run,
                 None if step is None else int(step), str(checkpoint), checkpoint_hash, int(seed),
                 protocol_json, _to_json(provenance)),
            )
            return int(cur.lastrowid)

    def _require_running(self, c: sqlite3.Connection, eval_id: int) -> None:
        row = c.execute("SELECT status FROM evaluations WHERE id = ?", (eval_id,)).fetchone()
        if row is None:
            raise ValueError(f"results store {self.path}: no evaluation with id {eval_id}")
        if row[0] != "running":
            raise ValueError(f"evaluation {eval_id} is {row[0]}; a finished evaluation cannot change "
                             "(start a new one with begin_evaluation)")

    def finish_evaluation(self, eval_id: int) -> None:
        with self._write() as c:
            self._require_running(c, eval_id)
            c.execute("UPDATE evaluations SET status = 'complete' WHERE id = ?", (eval_id,))

    def get_evaluation(self, eval_id: int) -> dict:
        """Evaluation row as a dict with protocol and provenance parsed."""
        row = self.conn.execute("SELECT * FROM evaluations WHERE id = ?", (eval_id,)).fetchone()
        if row is None:
            raise ValueError(f"results store {self.path}: no evaluation with id {eval_id}")
        return _parse_evaluation(row)

    # ---- per-image records ------------------------------------------------------------------

    def add_records(self, eval_id: int, evaluator: str, records: dict[str, Any]) -> int:
        """Store {key: record} in one transaction (a key already stored is overwritten)."""
        rows = [(eval_id, str(key), evaluator, _to_json(rec)) for key, rec in records.items()]
        with self._write() as c:
            self._require_running(c, eval_id)
            c.executemany(
                "INSERT OR REPLACE INTO records (evaluation_id, key, evaluator, record_json) "
                "VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    def existing_keys(self, eval_id: int, evaluator: str) -> set[str]:
        rows = self.conn.execute(
            "SELECT key FROM records WHERE evaluation_id = ? AND evaluator = ?", (eval_id, evaluator))
        return {r[0] for r in rows}

    def records_for(self, eval_id: int, evaluator: str) -> dict[str, Any]:
        rows = self.conn.execute(
            "SELECT key, record_json FROM records WHERE evaluation_id = ? AND evaluator = ? ORDER BY key",
            (eval_id, evaluator))
        return {r[0]: json.loads(r[1]) for r in rows}

    # ---- aggregate metrics ------------------------------------------------------------------

    def set_metrics(self, eval_id: int, evaluator: str, metrics: list[dict]) -> None:
        """Replace this evaluator's metrics for the evaluation. Each metric is a dict with
        name, value (finite float), scale, higher_is_better, version. NaN/inf raise ValueError."""
        rows = [(eval_id, evaluator, *_check_metric(m)) for m in metrics]
        names = [r[2] for r in rows]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluator {evaluator!r} reported a metric name twice: {sorted(names)}")
        with self._write() as c:
            self._require_running(c, eval_id)
            c.execute("DELETE FROM metrics WHERE evaluation_id = ? AND evaluator = ?", (eval_id, evaluator))
            c.executemany(
                "INSERT INTO metrics (evaluation_id, evaluator, name, value, scale, higher_is_better, version, "
                "stderr, n) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def metrics_frame(self, complete_only: bool = True):
        """pandas DataFrame, one row per metric, with every evaluation column; protocol and
        provenance parsed into dict columns. Columns: evaluation_id, created, suite, ..., status,
        protocol, provenance, evaluator, name, value, scale, higher_is_better (bool), version, stderr, n
        (the metric's standard error and the count it was computed over; None where the evaluator gives none)."""
        import pandas as pd  # only the leaderboard needs pandas; keep writers light

        where = "WHERE e.status = 'complete'" if complete_only else ""
        spread = "m.stderr, m.n" if _schema_version(self.conn) >= 2 else "NULL AS stderr, NULL AS n"   # read-only v1
        rows = self.conn.execute(
            f"SELECT e.*, m.evaluator, m.name, m.value, m.scale, m.higher_is_better, m.version, {spread} "
            f"FROM metrics m JOIN evaluations e ON e.id = m.evaluation_id {where} "
            "ORDER BY e.id, m.evaluator, m.name").fetchall()
        out = []
        for r in rows:
            d = _parse_evaluation(r)
            d["evaluation_id"] = d.pop("id")
            d.update(evaluator=r["evaluator"], name=r["name"], value=float(r["value"]),
                     scale=r["scale"], higher_is_better=bool(r["higher_is_better"]), version=r["version"],
                     stderr=r["stderr"], n=r["n"])
            out.append(d)
        columns = ["evaluation_id", *EVALUATION_COLUMNS[1:-3], "status", "protocol", "provenance",
                   "evaluator", "name", "value", "scale", "higher_is_better", "version", "stderr", "n"]
        return pd.DataFrame(out, columns=columns)

    def latest_metrics(self, suite: str | None = None):
        """metrics_frame() of complete evaluations, keeping only the newest evaluation for each
        (suite, suite_version, checkpoint_hash, seed, protocol), i.e. re-runs replace older runs."""
        frame = self.metrics_frame(complete_only=True)
        if suite is not None:
            frame = frame[frame["suite"] == suite]
        if frame.empty:
            return frame.reset_index(drop=True)
        identity = frame["protocol"].map(_to_json)
        keys = [frame["suite"], frame["suite_version"], frame["checkpoint_hash"], frame["seed"], identity]
        newest = frame.groupby(keys, dropna=False)["evaluation_id"].transform("max")
        return frame[frame["evaluation_id"] == newest].reset_index(drop=True)
