"""Results store and provenance: round trip, resume, NaN rejection, concurrent writers,
SIGKILL mid-write, and hashes that track file contents."""
from __future__ import annotations

import hashlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import provenance
from harness.store import ResultsStore

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = {"sampler": "maskgit", "steps": 16, "temperature": 1.0, "resolution": 256,
            "images_per_prompt": 4, "seeds": [0, 1, 2, 3]}


def metric(name: str, value: float) -> dict:
    return {"name": name, "value": value, "scale": "fraction", "higher_is_better": True, "version": "1"}


def begin(store: ResultsStore, seed: int = 0, protocol: dict = PROTOCOL, ckpt_hash: str = "abc123") -> int:
    return store.begin_evaluation("geneval", "1.0", "runs/a/step_100", seed, protocol,
                                  checkpoint_hash=ckpt_hash, backbone="tiny", method="ht_grpo",
                                  run="a", step=100, provenance={"git_commit": "deadbeef"})


def run_python(code: str, *args: str, **popen_kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)


def test_round_trip(tmp_path):
    with ResultsStore(tmp_path / "s.sqlite") as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        eid = begin(store)
        records = {"p0/0": {"correct": True, "score": 0.5}, "p0/1": {"correct": False, "boxes": [[1, 2, 3, 4]]}}
        assert store.add_records(eid, "geneval_det", records) == 2
        store.set_metrics(eid, "geneval_det", [metric("overall", 0.75), metric("counting", 0.5)])
        store.set_metrics(eid, "geneval_det", [metric("overall", 0.5)])  # set replaces, no stale "counting"
        assert store.metrics_frame().empty  # still running: not on the leaderboard
        store.finish_evaluation(eid)

        assert store.records_for(eid, "geneval_det") == records
        assert store.records_for(eid, "other") == {}
        ev = store.get_evaluation(eid)
        assert ev["status"] == "complete" and ev["protocol"] == PROTOCOL and ev["provenance"]["git_commit"] == "deadbeef"
        with pytest.raises(ValueError, match="complete"):
            store.add_records(eid, "geneval_det", {"p1/0": {}})

        frame = store.metrics_frame()
        assert len(frame) == 1
        row = frame.iloc[0]
        assert (row["evaluation_id"], row["suite"], row["step"], row["name"]) == (eid, "geneval", 100, "overall")
        assert row["value"] == 0.5 and frame["value"].dtype == float and frame["higher_is_better"].dtype == bool
        assert row["provenance"] == {"git_commit": "deadbeef"} and row["protocol"]["steps"] == 16

        # A re-run of the same evaluation replaces the old one in latest_metrics; another seed does not.
        rerun = begin(store)
        store.set_metrics(rerun, "geneval_det", [metric("overall", 0.625)])
        store.finish_evaluation(rerun)
        other_seed = begin(store, seed=1)
        store.set_metrics(other_seed, "geneval_det", [metric("overall", 0.25)])
        store.finish_evaluation(other_seed)
        latest = store.latest_metrics()
        assert sorted(latest["evaluation_id"]) == [rerun, other_seed]
        assert sorted(latest["value"]) == [0.25, 0.625]
        assert len(store.metrics_frame()) == 3


def test_default_location_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "sub" / "env.sqlite"))
    with ResultsStore() as store:
        assert store.path == tmp_path / "sub" / "env.sqlite"
    assert (tmp_path / "sub" / "env.sqlite").exists()


def test_resume_finds_unfinished_evaluation(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultsStore(path) as store:
        eid = begin(store)
        store.add_records(eid, "det", {"p0/0": {"ok": 1}, "p0/1": {"ok": 0}})
        store.add_records(eid, "clip", {"p0/0": {"s": 0.3}})
    with ResultsStore(path) as store:  # "after the crash"
        assert begin(store) == eid
        assert store.existing_keys(eid, "det") == {"p0/0", "p0/1"}
        assert store.existing_keys(eid, "clip") == {"p0/0"}
        # A different seed, checkpoint or protocol is a different evaluation.
        assert begin(store, seed=1) != eid
        assert begin(store, ckpt_hash="other") != eid
        assert begin(store, protocol={**PROTOCOL, "steps": 32}) != eid
        # resume=False always starts fresh; a finished evaluation is never resumed.
        fresh = store.begin_evaluation("geneval", "1.0", "x", 0, PROTOCOL, checkpoint_hash="abc123",
                                       provenance={}, resume=False)
        assert fresh not in (eid, None)
        assert begin(store) == fresh  # newest unfinished one wins
        store.finish_evaluation(fresh)
        store.finish_evaluation(eid)
        assert begin(store) not in (eid, fresh)


def test_checkpoint_hash_computed_from_path(tmp_path):
    ckpt = tmp_path / "ckpt.bin"
    ckpt.write_bytes(b"weights")
    with ResultsStore(tmp_path / "s.sqlite") as store:
        eid = store.begin_evaluation("geneval", "1.0", str(ckpt), 0, PROTOCOL, provenance={})
        assert store.get_evaluation(eid)["checkpoint_hash"] == hashlib.sha256(b"weights").hexdigest()
        with pytest.raises(FileNotFoundError, match="missing"):
            store.begin_evaluation("geneval", "1.0", str(tmp_path / "missing"), 0, PROTOCOL, provenance={})


@pytest.mark.parametrize("bad", [math.nan, float("inf"), "n/a"])
def test_bad_metric_value_rejected(tmp_path, bad):
    with ResultsStore(tmp_path / "s.sqlite") as store:
        eid = begin(store)
        store.set_metrics(eid, "det", [metric("overall", 0.5)])
        with pytest.raises(ValueError, match="counting"):
            store.set_metrics(eid, "det", [metric("overall", 0.9), metric("counting", bad)])
        # The rejected call changed nothing.
        rows = store.conn.execute("SELECT name, value FROM metrics").fetchall()
        assert [tuple(r) for r in rows] == [("overall", 0.5)]
        with pytest.raises(ValueError, match="missing fields"):
            store.set_metrics(eid, "det", [{"name": "overall", "value": 1.0}])


WRITER = """
import sys, time
from harness.store import ResultsStore
path, eid, prefix, start_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
store = ResultsStore(path)
time.sleep(max(0.0, start_at - time.time()))  # both writers start together, so they contend
for batch in range(100):
    store.add_records(eid, "det", {f"{prefix}/{batch}/{i}": {"v": i} for i in range(10)})
    store.set_metrics(eid, prefix, [{"name": "n", "value": float(batch), "scale": "count",
                                     "higher_is_better": True, "version": "1"}])
    _ = store.existing_keys(eid, "det")
print("done")
"""


def test_concurrent_writers(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultsStore(path) as store:
        eid = begin(store)
    start_at = str(time.time() + 0.5)
    procs = [run_python(WRITER, str(path), str(eid), prefix, start_at) for prefix in ("a", "b")]
    outputs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "locked" not in err and out.strip() == "done"
    with ResultsStore(path) as store:
        keys = store.existing_keys(eid, "det")
        assert keys == {f"{p}/{b}/{i}" for p in "ab" for b in range(100) for i in range(10)}
        values = dict(store.conn.execute("SELECT evaluator, value FROM metrics").fetchall())
        assert values == {"a": 99.0, "b": 99.0}


CRASHER = """
import sys
from harness.store import ResultsStore
store = ResultsStore(sys.argv[1])
payload = "x" * 200
for seed in range(10_000):
    eid = store.begin_evaluation("geneval", "1.0", "ck", seed, {"steps": 4}, checkpoint_hash="h",
                                 provenance={})
    for batch in range(4):
        store.add_records(eid, "det", {f"{batch}/{i}": {"pad": payload, "i": i} for i in range(100)})
    store.set_metrics(eid, "det", [{"name": "overall", "value": 0.5, "scale": "fraction",
                                    "higher_is_better": True, "version": "1"}])
    store.finish_evaluation(eid)
    print(seed, flush=True)
"""


def test_sigkill_mid_write_leaves_consistent_store(tmp_path):
    path = tmp_path / "s.sqlite"
    ResultsStore(path).close()
    proc = run_python(CRASHER, str(path))
    for _ in range(3):  # let it commit a few full evaluations, then kill it somewhere mid-stream
        assert proc.stdout.readline().strip() != "", proc.stderr.read()
    time.sleep(0.013)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with ResultsStore(path) as store:
        evals = store.conn.execute("SELECT id, status FROM evaluations").fetchall()
        complete = [e for e, s in evals if s == "complete"]
        assert len(complete) >= 3
        for eid, status in evals:
            n_records = len(store.existing_keys(eid, "det"))
            n_metrics = store.conn.execute("SELECT COUNT(*) FROM metrics WHERE evaluation_id = ?", (eid,)).fetchone()[0]
            if status == "complete":
                assert (n_records, n_metrics) == (400, 1)
            else:  # interrupted: whole batches only, metrics only after all records
                assert n_records % 100 == 0 and n_metrics in ((0,) if n_records < 400 else (0, 1))
        assert len(store.metrics_frame()) == len(complete)
        # The interrupted evaluation (if the kill landed after its begin) resumes under the same id.
        running = [e for e, s in evals if s == "running"]
        if running:
            seed = store.get_evaluation(running[-1])["seed"]
            assert store.begin_evaluation("geneval", "1.0", "ck", seed, {"steps": 4}, checkpoint_hash="h",
                                          provenance={}) == running[-1]


def test_provenance_versions_and_hashes(tmp_path):
    versions = provenance.library_versions()
    assert versions["python"].count(".") == 2 and "torch" in versions and "numpy" in versions
    # Versions come from package metadata: recording them (or opening a store) imports no heavy module.
    light = run_python("""
        import sys
        from harness import provenance, store
        provenance.library_versions()
        print(sorted(m for m in ("torch", "transformers", "diffusers", "pandas") if m in sys.modules))
    """)
    out, err = light.communicate(timeout=30)
    assert out.strip() == "[]", err

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert provenance.file_hash(f) == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(FileNotFoundError):
        provenance.file_hash(tmp_path / "nope.bin")

    # Directory checkpoints: same contents -> same hash whatever order files were created in.
    a, b = tmp_path / "a", tmp_path / "b"
    for d, order in ((a, ["model.safetensors", "sub/cfg.json"]), (b, ["sub/cfg.json", "model.safetensors"])):
        for name in order:
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(name.encode())
    h = provenance.checkpoint_hash(a)
    assert h == provenance.checkpoint_hash(a) == provenance.checkpoint_hash(b)
    (b / "model.safetensors").write_bytes(b"changed weights")
    assert provenance.checkpoint_hash(b) != h
    (b / "model.safetensors").write_bytes(b"model.safetensors")
    assert provenance.checkpoint_hash(b) == h
    (b / "sub/cfg.json").rename(b / "sub/config.json")  # renames count too
    assert provenance.checkpoint_hash(b) != h
    assert provenance.weight_hashes({"policy": a, "w": f}) == {"policy": h, "w": provenance.file_hash(f)}

    assert provenance.git_commit(tmp_path) is None  # not a repository
    info = provenance.collect(suite_version="1.0", seeds=[0, 1], checkpoint_hash=h)
    assert info["versions"] == versions and info["checkpoint_hash"] == h and info["seeds"] == [0, 1]
    assert info["time_utc"].endswith("+00:00") and info["host"]
    commit = info["git_commit"]
    assert commit is None or len(commit.removesuffix("-dirty")) == 40


def test_a_version_1_store_is_read_as_is_and_upgraded_when_written(tmp_path):
    """Stores written before metrics had stderr / n: read-only opens see NULLs without touching the file; a
    writable open adds the columns in place and keeps every row."""
    import sqlite3
    import harness.store as store_module
    path = tmp_path / "v1.sqlite"
    with ResultsStore(path) as s:
        eid = s.begin_evaluation("suite", "1", "ckpt", 0, {"p": 1}, checkpoint_hash="h", provenance={})
        s.set_metrics(eid, "ev", [{"name": "m", "value": 0.5, "scale": "0-1", "higher_is_better": True,
                                   "version": "1", "stderr": 0.1, "n": 8}])
        s.finish_evaluation(eid)
    conn = sqlite3.connect(path)      # make it a version-1 file: no stderr / n columns
    conn.execute("CREATE TABLE m1 AS SELECT evaluation_id, evaluator, name, value, scale, higher_is_better, version "
                 "FROM metrics")
    conn.execute("DROP TABLE metrics")
    conn.execute("ALTER TABLE m1 RENAME TO metrics")
    conn.execute("UPDATE schema_version SET version = 1")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with ResultsStore(path, readonly=True) as s:
        frame = s.latest_metrics()
    assert frame["value"].tolist() == [0.5] and frame["stderr"].isna().all() and path.read_bytes() == before
    with ResultsStore(path) as s:
        assert store_module._schema_version(s.conn) == store_module.SCHEMA_VERSION
        assert s.latest_metrics()["value"].tolist() == [0.5]


def test_metric_stderr_and_n_round_trip_and_bad_ones_are_refused(tmp_path):
    with ResultsStore(tmp_path / "s.sqlite") as s:
        eid = s.begin_evaluation("suite", "1", "ckpt", 0, {}, checkpoint_hash="h", provenance={})
        metric = {"name": "m", "value": 0.5, "scale": "0-1", "higher_is_better": True, "version": "1"}
        s.set_metrics(eid, "ev", [{**metric, "stderr": 0.03, "n": 48}, {**metric, "name": "plain"}])
        s.finish_evaluation(eid)
        frame = s.latest_metrics().set_index("name")
        assert frame.loc["m", "stderr"] == 0.03 and frame.loc["m", "n"] == 48 and frame["stderr"].isna().sum() == 1
        eid = s.begin_evaluation("suite", "1", "ckpt2", 0, {}, checkpoint_hash="h2", provenance={})
        for bad in ({"stderr": -1.0}, {"stderr": float("nan")}, {"n": 2.5}):
            with pytest.raises(ValueError, match="stderr|n "):
                s.set_metrics(eid, "ev", [{**metric, **bad}])
