"""Failure behaviour (issue 17 item 4): a hung reward scorer times out with bounded retries instead of hanging the
run (or, under torchrun, the ranks waiting for its rewards); a rank that raises ends the whole torchrun job with
one line naming the rank and the error, and nothing half-written in the run folder."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from evaluators.base import Evaluator
from harness import registry
from trainers.rewards import build_reward, call_with_timeout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import BIN, ROOT, free_port, write_config  # noqa: E402


def test_timeout_retries_then_fails_with_one_clear_line():
    calls = []
    release = threading.Event()

    def hangs():
        calls.append(1)
        release.wait(30)        # a stuck scorer (released at the end so the daemon threads finish)
        return "late"

    t0 = time.time()
    with pytest.raises(TimeoutError, match=r"reward 'stuck' gave no scores within 0.2 s, 3 tries; stopping"):
        call_with_timeout(hangs, 0.2, 3, "stuck")
    release.set()
    assert len(calls) == 3 and time.time() - t0 < 5


def test_a_hang_then_an_answer_is_retried_and_errors_are_not():
    state = {"n": 0}
    release = threading.Event()

    def first_hangs():
        state["n"] += 1
        if state["n"] == 1:
            release.wait(30)
            return "stale"
        return "fresh"

    assert call_with_timeout(first_hangs, 0.2, 2, "flaky") == "fresh"
    release.set()

    def raises():
        state["n"] += 1
        raise ValueError("bad image")
    state["n"] = 0
    with pytest.raises(ValueError, match="bad image"):
        call_with_timeout(raises, 5, 3, "broken")
    assert state["n"] == 1        # an error is an answer: not retried
    assert call_with_timeout(lambda: 7, 0, 1, "unbounded") == 7   # 0 = no limit, called in this thread


def test_grad_mode_is_carried_into_the_scoring_thread():
    with torch.no_grad():
        assert call_with_timeout(torch.is_grad_enabled, 5, 1, "grad") is False
    assert call_with_timeout(torch.is_grad_enabled, 5, 1, "grad") is True


RELEASE = threading.Event()


def _hung_score(samples):
    RELEASE.wait(30)
    return {s.key: {"score": 1.0} for s in samples}


HUNG_REWARD = Evaluator(name="test-hung-reward", version="1", description="test evaluator: never answers",
                        score=_hung_score, aggregate=lambda records: [], reward_field="score")


def test_build_reward_times_out_a_hung_scorer(monkeypatch):
    registry.register("evaluators", "test-hung-reward", f"{__name__}:HUNG_REWARD")
    try:
        monkeypatch.setenv("HARNESS_REWARD_TIMEOUT_S", "0.2")
        monkeypatch.setenv("HARNESS_REWARD_TRIES", "2")
        reward = build_reward({"test-hung-reward": 1.0})
        with pytest.raises(TimeoutError, match="'test-hung-reward' gave no scores within 0.2 s, 2 tries"):
            reward([object()])
        monkeypatch.setenv("HARNESS_REWARD_TRIES", "zero")
        with pytest.raises(ValueError, match="HARNESS_REWARD_TRIES='zero' is not a number"):
            build_reward({"test-hung-reward": 1.0})
    finally:
        RELEASE.set()
        registry._ENTRIES["evaluators"].pop("test-hung-reward", None)
        registry._LOADED.pop(("evaluators", "test-hung-reward"), None)


# --- a rank that fails under torchrun ------------------------------------------------------------------------------

def failing_rank_worker(config: str, run_dir: str) -> None:
    """`harness train` through the real CLI, with rank 1's reward raising at step 1 (a broken scorer on one GPU)."""
    import trainers.loop as loop
    real = loop.build_reward

    def build(weights):
        reward = real(weights)
        calls = {"n": 0}

        def maybe_fail(samples):
            calls["n"] += 1
            if os.environ.get("RANK") == "1" and calls["n"] == 2:
                raise ValueError("scorer crashed on this rank's images")
            return reward(samples)
        return maybe_fail

    loop.build_reward = build
    from harness.cli import app
    app(["train", "--config", config, "--run-dir", run_dir], prog_name="harness")


def test_a_failing_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    config = write_config(tmp_path / "cfg.yaml", steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HARNESS_DIST_TIMEOUT_S": "60"}
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", sys.executable, __file__, "worker", config,
           tmp_path / "run"]
    t0 = time.time()
    out = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode != 0
    assert time.time() - t0 < 60          # torchrun ended rank 0 (waiting in the rewards' gather) at once
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert "error: [rank 1/2] scorer crashed on this rank's images" in errors, out.stderr[-3000:]
    assert "Traceback" not in out.stderr.split("error: [rank 1/2]")[0]   # the rank's own output is one line
    run = tmp_path / "run"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000001"]   # step 1 complete, no tmp
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    failing_rank_worker(sys.argv[2], sys.argv[3])
