"""Official stacks in their own envs (harness/envs.py) and the worker protocol (harness/worker.py,
harness/workers/wire.py), without building a real env: a fake worker run by this venv's python, and builds whose
venv is a stub, so the whole file takes a few seconds."""
from __future__ import annotations

import json
import re
import shlex
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluators.base import Evaluator, Metric, Sample
from harness import envs, worker
from harness.cli import app

REPO = Path(__file__).resolve().parent.parent
WIRE_DIR = REPO / "harness" / "workers"

FAKE_WORKER = f"""
import os, sys, time
sys.path.insert(0, {str(WIRE_DIR)!r})
import wire
wire.take_stdout()
print("noise on stdout that must not reach the protocol")
if os.environ.get("FAKE_MODE") == "no-ready":
    sys.exit(4)
if os.environ.get("FAKE_MODE") == "garbage-ready":
    wire.take_stdout().write("loading...\\n")

def echo(**args):
    return args

def score(items, crash_after=None, garbage=False, sleep=0.0):
    out = []
    for i, item in enumerate(items):
        if crash_after is not None and i == crash_after:
            print("about to crash", file=sys.stderr, flush=True)
            os._exit(3)
        from PIL import Image
        with Image.open(item["image"]) as im:
            out.append(float(sum(im.convert("L").getdata())) / 255.0)
    if garbage:
        wire.take_stdout().write("{{half a line\\n")
        wire.take_stdout().flush()
        time.sleep(30)
    time.sleep(sleep)
    return out

def fail():
    raise ValueError("the model folder lacks config.yaml")

wire.serve("fake", {{"echo": echo, "score": score, "fail": fail}}, {{"python": sys.version.split()[0]}})
"""


@pytest.fixture
def fake_worker(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    made = []

    def make(**env) -> worker.Worker:
        w = worker.Worker([sys.executable, script], name="fake", start_timeout=30, env=env)
        made.append(w)
        return w
    yield make
    for w in made:
        w.kill()


def test_round_trip_and_errors_keep_the_worker(fake_worker):
    w = fake_worker().start()
    assert w.hello["worker"] == "fake" and w.hello["versions"]["python"]
    assert w.request("echo", {"a": [1, 2.5, "x"], "b": None}, timeout=10) == {"a": [1, 2.5, "x"], "b": None}
    with pytest.raises(worker.WorkerError, match="fail failed: ValueError: the model folder lacks config.yaml"):
        w.request("fail", {}, timeout=10)
    with pytest.raises(worker.WorkerError, match="unknown op 'nope'"):
        w.request("nope", {}, timeout=10)
    assert w.alive() and w.request("echo", {"again": True}, timeout=10) == {"again": True}
    images = [np.full((4, 5, 3), v, dtype=np.uint8) for v in (0, 255)]
    with worker.png_files(images) as paths:
        assert w.request("score", {"items": [{"image": p} for p in paths]}, timeout=10) == [0.0, 20.0]
        folder = Path(paths[0]).parent
    assert not folder.exists()                       # the PNGs are removed afterwards
    w.close()
    assert not w.alive()


def test_timeout_kills_the_worker_with_a_clear_error(fake_worker):
    w = fake_worker().start()
    with pytest.raises(worker.WorkerError, match=r"worker fake did not answer request 'score' within 0.5 s; killed"):
        w.request("score", {"items": [], "sleep": 20}, timeout=0.5)
    assert not w.alive()
    assert w.request("echo", {"x": 1}, timeout=10) == {"x": 1}        # the next request starts a fresh one


def test_environment_variable_sets_the_timeout(fake_worker, monkeypatch):
    monkeypatch.setenv(worker.TIMEOUT_ENV, "0.3")
    w = fake_worker().start()
    with pytest.raises(worker.WorkerError, match="within 0.3 s"):
        w.request("score", {"items": [], "sleep": 20}, timeout=100)
    monkeypatch.setenv(worker.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="must be a number of seconds"):
        worker.timeout_for(1)


def test_malformed_line_and_death_before_ready(fake_worker):
    w = fake_worker().start()
    with pytest.raises(worker.WorkerError,
                       match=r"sent a line that is not JSON during request 'score': '\{half a line'"):
        w.request("score", {"items": [], "garbage": True}, timeout=10)
    assert not w.alive()
    with pytest.raises(worker.WorkerError, match=r"worker fake died \(exit code 4\) during start; its last output: "
                                                 r"noise on stdout"):
        fake_worker(FAKE_MODE="no-ready").start()
    with pytest.raises(worker.WorkerError, match="not JSON during start: 'loading...'"):
        fake_worker(FAKE_MODE="garbage-ready").start()
    with pytest.raises(worker.WorkerError, match="cannot start"):
        worker.Worker(["/nonexistent/python"], name="fake").start()


def test_crash_mid_batch_stores_nothing(fake_worker, tmp_path):
    """A worker that dies halfway through a batch: a one-line error naming it, and no record in the store."""
    from evaluators.run import ImageRef, _score_and_store
    from harness.store import ResultsStore
    from PIL import Image

    w = fake_worker()
    crash = {"after": 2}

    def score(samples: list[Sample]) -> dict[str, dict]:
        with worker.png_files([s.image for s in samples]) as paths:
            values = w.request("score", {"items": [{"image": p} for p in paths], "crash_after": crash["after"]},
                               timeout=20)
        return {s.key: {"score": v} for s, v in zip(samples, values)}

    fake = Evaluator(name="fake-worker", version="1", description="test", score=score,
                     aggregate=lambda records: [Metric("fake", float(np.mean([r["score"] for r in records])))])
    refs = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((4, 4, 3), 60 * i, dtype=np.uint8)).save(path)
        refs.append(ImageRef(key=f"{i:05d}/0", path=path, metadata={"prompt": "p"}, prompt_index=i))
    with ResultsStore(tmp_path / "store.sqlite") as store:
        eval_id = store.begin_evaluation("t", "1", "x", 0, {}, checkpoint_hash="abc", provenance={})
        with pytest.raises(worker.WorkerError, match=r"worker fake died \(exit code 3\) during request 'score'; "
                                                     r"its last output: .*about to crash"):
            _score_and_store(refs, [fake], store, eval_id, 0, 8, None, None)
        assert store.existing_keys(eval_id, "fake-worker") == set()
        crash["after"] = None                                       # the re-run scores everything
        metrics = _score_and_store(refs, [fake], store, eval_id, 0, 8, None, None)
        assert len(store.existing_keys(eval_id, "fake-worker")) == 4 and metrics["fake"] == pytest.approx(16 * 90 / 255)


def test_incomplete_batch_answers_are_refused():
    from evaluators.official import _complete
    assert _complete([[1], [2, 3]], 2, "x", [1, 2]) == [[1], [2, 3]]
    for bad, per in (([1], None), ([[1], [2]], [1, 2]), ({"a": 1}, None)):
        with pytest.raises(worker.WorkerError, match="nothing stored"):
            _complete(bad, 2, "x", per)


# --- building envs: recipe hash, reuse, rebuild, atomicity, pip errors ------------------------------------------

STUB_PYTHON = """#!/bin/bash
# a stand-in venv python: pip installs succeed unless a requirement starts with nosuch; everything else exits 0
if [ "$1" = "-m" ] && [ "$2" = "pip" ] && [ "$3" = "install" ]; then
  for a in "$@"; do case "$a" in nosuch*)
    echo "ERROR: Could not find a version that satisfies the requirement $a (from versions: none)"
    echo "ERROR: No matching distribution found for $a"; exit 1;; esac; done
  echo "Successfully installed $*"
fi
exit 0
"""


@pytest.fixture
def stub_envs(tmp_path, monkeypatch):
    """$HARNESS_ENVS in tmp, a test recipe, and `python -m venv` replaced by a stub venv (bin/python above)."""
    monkeypatch.setenv(envs.ROOT_ENV, str(tmp_path / "envs"))
    recipes = {"toy": envs.Recipe(name="toy", description="a test stack", steps=(envs.Step(("toy==1.0",)),),
                                  size="seconds")}
    monkeypatch.setattr(envs, "RECIPES", recipes)
    real_run = envs._run
    calls = []

    def run(argv, log, what, env_name, timeout=None):
        calls.append(what)
        if what == "python -m venv":
            folder = Path(argv[-1])
            (folder / "bin").mkdir(parents=True)
            (folder / "bin" / "python").write_text(STUB_PYTHON)
            (folder / "bin" / "python").chmod(0o755)
            (folder / "bin" / "tool").write_text(f"#!{folder}/bin/python\nprint('hi')\n")
            envs._site_packages(folder).mkdir(parents=True)
            (envs._site_packages(folder) / "cuda_only.so").write_text("")
            return
        real_run(argv, log, what, env_name, timeout)
    monkeypatch.setattr(envs, "_run", run)
    return recipes, calls


def test_build_reuses_a_current_env_and_rebuilds_a_changed_recipe(stub_envs):
    recipes, calls = stub_envs
    assert envs.state("toy") == "not built"
    with pytest.raises(envs.EnvError, match=r"environment 'toy' is not built: run `harness env build toy` \(seconds\)"):
        envs.require("toy")
    folder = envs.build("toy", say=lambda _: None)
    assert folder == envs.root() / "toy" and envs.state("toy") == "built"
    assert envs.require("toy") == folder / "bin" / "python"
    assert (folder / "bin" / "tool").read_text().startswith(f"#!{folder}/bin/python")     # shebangs point here
    recorded = json.loads((folder / envs.RECIPE_FILE).read_text())
    assert recorded["digest"] == recipes["toy"].digest()
    assert recorded["recipe"]["steps"][0]["requirements"] == ["toy==1.0"]
    assert sorted(p.name for p in envs.root().iterdir()) == [".toy.lock", "toy", "toy.build.log"]   # no temp left

    calls.clear()
    said = []
    assert envs.build("toy", say=said.append) == folder and calls == [] and "up to date" in said[0]

    # the description is prose: it does not change the hash; a requirement or a removed file does
    recipes["toy"] = envs.Recipe(name="toy", description="other words", steps=recipes["toy"].steps, size="seconds")
    assert envs.state("toy") == "built"
    recipes["toy"] = envs.Recipe(name="toy", description="a test stack", steps=(envs.Step(("toy==1.1",)),),
                                 remove=("*.so",))
    assert envs.state("toy") == "stale"
    with pytest.raises(envs.EnvError, match="was built from an older recipe"):
        envs.require("toy")
    envs.build("toy", say=lambda _: None)
    assert envs.state("toy") == "built" and not (envs._site_packages(folder) / "cuda_only.so").exists()
    assert calls.count("python -m venv") == 1
    calls.clear()
    envs.build("toy", force=True, say=lambda _: None)
    assert calls.count("python -m venv") == 1


def test_a_failed_build_names_the_package_and_keeps_the_old_env(stub_envs):
    recipes, _ = stub_envs
    good = envs.build("toy", say=lambda _: None)
    recipes["toy"] = envs.Recipe(name="toy", description="x", steps=(envs.Step(("toy==1.0", "nosuchpkg==9.9")),))
    with pytest.raises(envs.EnvError) as e:
        envs.build("toy", say=lambda _: None)
    message = str(e.value)
    assert "\n" not in message and re.fullmatch(
        r"environment 'toy': pip could not install nosuchpkg==9.9 \(no matching distribution\); full log: \S+", message)
    assert "No matching distribution found for nosuchpkg" in (envs.root() / "toy.build.log").read_text()
    assert envs.built_digest(good) is not None and envs.state("toy") == "stale"       # the old one is intact
    assert not [p for p in envs.root().iterdir() if ".build-" in p.name]               # the temp folder is gone


@pytest.mark.parametrize("output, package, reason", [
    ("Collecting x\nERROR: Could not find a version that satisfies the requirement foo==1 (from versions: 0.9)\n"
     "ERROR: No matching distribution found for foo==1\n", "foo==1", "no matching distribution"),
    ("  error: subprocess-exited-with-error\n  Building wheel for fairseq-fixed (pyproject.toml) ... error\n"
     "Failed to build fairseq-fixed\n", "fairseq-fixed", "its build failed"),
    ("ERROR: Cannot install a==1 and b==2 because these package versions have conflicting dependencies.\n",
     "a==1 and b==2", "conflicting pins"),
    ("ERROR: Invalid requirement: 'x==='\n", "x===", "invalid requirement"),
    ("something else\nERROR: disk full\n", "?", "ERROR: disk full"),
])
def test_pip_failures_are_named(output, package, reason):
    assert envs.pip_failure(output) == (package, reason)


def test_cli_env_ls_build_and_path(stub_envs):
    runner = CliRunner()
    result = runner.invoke(app, ["env", "ls"])
    assert result.exit_code == 0, result.output
    root = envs.root()
    assert f"environments under {root}" in result.output
    assert re.search(rf"toy\s+not built\s+{re.escape(str(root / 'toy'))}", result.output)
    assert "a test stack (seconds)" in result.output
    result = runner.invoke(app, ["env", "path", "toy"])
    assert result.exit_code == 1 and "is not built: run `harness env build toy`" in result.output
    result = runner.invoke(app, ["env", "build", "toy"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(root / "toy")
    assert re.search(r"toy\s+built\s+", runner.invoke(app, ["env", "ls"]).output)
    assert runner.invoke(app, ["env", "path", "toy"]).stdout.strip() == str(root / "toy")
    for args, code, text in ((["env", "path", "tyo"], 2, "unknown environment 'tyo'. Did you mean 'toy'?"),
                             (["env", "build"], 2, "give environment names or --all"),
                             (["env", "build", "toy", "--all"], 2, "give environment names or --all")):
        result = runner.invoke(app, args)
        assert result.exit_code == code and text in result.output and "Traceback" not in result.output


def test_real_recipes_are_pinned_and_probe_a_worker():
    for name, r in envs.RECIPES.items():
        assert r.name == name and r.probe and (WIRE_DIR / r.probe).is_file()
        for step in r.steps:
            for requirement in step.requirements:
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.+]*", requirement), (name, requirement)
        assert {"torch==2.13.0", "torchvision==0.28.0"} <= set(r.constraints)
    assert len({r.digest() for r in envs.RECIPES.values()}) == len(envs.RECIPES)


def test_official_evaluators_are_registered_and_need_their_env(tmp_path, monkeypatch):
    from harness import registry
    monkeypatch.setenv(envs.ROOT_ENV, str(tmp_path / "none"))
    for name in ("dpg-official", "imagereward-official", "hpsv2-official"):
        e = registry.get("evaluators", name)
        assert e.name == name and e.reward_field == "score"
        with pytest.raises(envs.EnvError, match=rf"environment '{name}' is not built: run `harness env build {name}`"):
            e.check_ready()


def test_docs_commands_run_as_written(stub_envs, monkeypatch):
    """Every `harness env ...` line of docs/envs.md that builds nothing runs here (on a stub env root)."""
    text = (REPO / "docs" / "envs.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("harness env ") and " build" not in line]
    assert {"ls", "path"} <= {c[2] for c in commands}, commands
    recipes, _ = stub_envs
    for name in {c[3] for c in commands if c[2] == "path"}:
        recipes[name] = envs.Recipe(name=name, description="x", steps=())
        envs.build(name, say=lambda _: None)
    for command in commands:
        result = CliRunner().invoke(app, command[1:])
        assert result.exit_code == 0, (command, result.output)
