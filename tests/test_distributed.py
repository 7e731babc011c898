"""One process vs two (torchrun, gloo, CPU): training and evaluation give the same results for any world size.

What is compared, and how close (docs/distributed.md states the same):
- rollout codes (hence images), rewards and every reward-derived number of the log line: exactly equal;
- losses, ratios, KL, grad norm: within 1e-5 relative / 1e-6 absolute (the ranks' partial sums of the loss and
  the gradients are added in another order than one process adds them);
- weights after K updates: within 1e-6 absolute; resume of a 2-process checkpoint in 1 process: same losses;
- sharded eval: images bit-identical (same files), stored metrics and records equal, pre-existing images kept.

Each torchrun launch costs ~5 s on 2 cores (two interpreters importing torch); three launches in all.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RTOL, ATOL, WTOL = 1e-5, 1e-6, 1e-6

CONFIG = {
    "name": "dist-test", "seed": 3, "steps": 3,
    "backbone": {"name": "tiny", "checkpoint": "", "options": {"d_model": 32, "n_layers": 1, "n_heads": 2}},
    "method": {"name": "ht-grpo", "inner_iterations": 2, "n_global": 1, "n_struct": 1},
    # 4 prompts x G=4: each rank takes 2 whole groups; micro-batches of 3 do not align with the groups
    "rollout": {"prompts_per_step": 4, "group_size": 4, "batch_size": 4, "sampler": {"steps": 8}},
    "reward": {"shapes-fidelity": 1.0},
    "loss": {"micro_batch": 3},
    "checkpoint": {"every": 1, "eval_suite": None},
    "tensorboard": False,
}
EXACT = ("reward_mean", "reward_std", "zero_spread_frac", "forward_passes_per_update", "lr", "step")
CLOSE = ("loss", "ratio_mean", "ratio_min", "ratio_max", "ratio_first_iter_max_dev", "clip_frac", "kl", "grad_norm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd=ROOT, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HARNESS_DIST_TIMEOUT_S": "120"}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None)
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", *map(str, args)]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def write_config(path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_line_equal(a: dict, b: dict) -> None:
    for k in EXACT:
        assert a[k] == b[k], (k, a[k], b[k])
    for k in [k for k in a if k.startswith(("reward/", "reward_by_tag/"))]:
        assert a[k] == b[k], (k, a[k], b[k])
    for k in CLOSE + tuple(k for k in a if k.startswith(("loss/", "kl/"))):
        assert b[k] == pytest.approx(a[k], rel=RTOL, abs=ATOL), (k, a[k], b[k])
    assert set(a) == set(b)


def max_weight_diff(a: Path, b: Path) -> float:
    from harness.checkpoint import load_weights
    wa, _ = load_weights(a)
    wb, _ = load_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


# --- the worker: train_step under torchrun, the step's rollout codes and log lines -------------------------------

def worker(config: str, out: str, steps: int) -> None:
    from harness import distributed
    from harness.config import load_config
    from trainers.config import TrainConfig
    from trainers.loop import build_trainer, train_step
    torch.set_num_threads(1)
    with distributed.session():
        tr = build_trainer(load_config(TrainConfig, config, []))
        lines, codes = [], []
        for step in range(steps):
            lines.append(train_step(tr, step))
            codes.append(tr.last_codes.cpu())
        if distributed.is_main():
            torch.save({"lines": lines, "codes": codes, "weights": tr.backbone.module.state_dict(),
                        "world": distributed.world_size()}, out)


def test_train_step_two_processes_equals_one(tmp_path):
    config = write_config(tmp_path / "cfg.yaml")
    worker(str(config), str(tmp_path / "one.pt"), 2)
    torchrun(sys.executable, __file__, "worker", config, tmp_path / "two.pt", 2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["world"] == 1 and two["world"] == 2
    for a, b in zip(one["codes"], two["codes"]):
        assert torch.equal(a, b)          # the rollouts (images) of every step
    for a, b in zip(one["lines"], two["lines"]):
        assert_line_equal(a, b)
    assert one["lines"][0]["grad_norm"] > 0   # the updates did something
    for k in one["weights"]:
        assert torch.allclose(one["weights"][k], two["weights"][k], rtol=0, atol=WTOL), k


def test_train_cli_two_processes_checkpoints_and_resume_at_one(tmp_path):
    from harness.runs import RunDir
    from harness.config import load_config
    from trainers.config import TrainConfig
    from trainers.loop import cli_train, read_trainer_state, train
    config = write_config(tmp_path / "cfg.yaml")
    train(load_config(TrainConfig, str(config), []), tmp_path / "one", log=lambda *a: None)
    out = torchrun(BIN / "harness", "train", "--config", config, "--run-dir", tmp_path / "two")
    assert out.stdout.count("run: ") == 1 and "2 processes, strategy ddp" in out.stdout   # rank 0 speaks
    one, two = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    lines_one = [json.loads(x) for x in one.metrics_path.read_text().splitlines()]
    lines_two = [json.loads(x) for x in two.metrics_path.read_text().splitlines()]
    assert len(lines_one) == len(lines_two) == 3                # rank 0 alone wrote metrics.jsonl
    for a, b in zip(lines_one, lines_two):
        assert_line_equal(a, b)
    for c1, c2 in zip(one.checkpoints(), two.checkpoints()):
        assert c1.step == c2.step
        assert max_weight_diff(c1.weights, c2.weights) <= WTOL
    state = read_trainer_state(two.checkpoints()[-1].trainer_state)
    assert (state["world_size"], state["strategy"]) == (2, "ddp")
    assert not list(two.checkpoints_dir.glob(".tmp_*"))

    # resume the 2-process run at 1 process from its step-2 checkpoint: step 3 is the uninterrupted run's
    third = tmp_path / "resumed"
    shutil.copytree(two.path, third)
    shutil.rmtree(RunDir(third).checkpoint_path(3))
    cli_train(resume=str(third), log=lambda *a: None)
    resumed = [json.loads(x) for x in RunDir(third).metrics_path.read_text().splitlines()]
    assert len(resumed) == 3
    assert_line_equal(lines_one[2], resumed[2])
    assert max_weight_diff(one.checkpoint_path(3) / "model.safetensors",
                           RunDir(third).checkpoint_path(3) / "model.safetensors") <= WTOL


def small_suites(folder: Path) -> list[Path]:
    """shapes-geneval and shapes-dpg cut down (3 images per prompt; 5 DPG grids of 4 tiles)."""
    out = []
    for name, change in (("shapes-geneval", {"prompts": {"max_prompts_per_tag": 2}, "min_images_per_tag": None,
                                              "images_per_prompt": 3}),
                         ("shapes-dpg", {"prompts": {"count": 5}})):
        suite = yaml.safe_load((ROOT / "evaluators" / "suites" / f"{name}.yaml").read_text())
        suite["prompts"].update(change.pop("prompts"))
        suite.update(change, version="dist-test")
        suite["sampler"]["steps"] = 4
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(suite))
        out.append(folder / f"{name}.yaml")
    return out


def stored(path: Path) -> tuple[list, list]:
    with sqlite3.connect(path) as conn:
        metrics = conn.execute("SELECT e.suite, m.evaluator, m.name, m.value FROM metrics m JOIN evaluations e "
                               "ON e.id = m.evaluation_id ORDER BY e.suite, m.evaluator, m.name").fetchall()
        records = conn.execute("SELECT * FROM records").fetchall()
    return metrics, sorted(map(repr, records))


def test_sharded_eval_equals_one_process_and_keeps_drawn_images(tmp_path):
    from evaluators.run import evaluate_checkpoints
    from harness.config import load_config
    from harness.store import ResultsStore
    from trainers.config import TrainConfig
    from trainers.loop import train
    config = write_config(tmp_path / "cfg.yaml", steps=1)
    run = train(load_config(TrainConfig, str(config), []), tmp_path / "run", log=lambda *a: None)
    ckpt = run / "checkpoints" / "step_000001"
    suites = small_suites(tmp_path)
    with ResultsStore(tmp_path / "one.sqlite") as store:
        evaluate_checkpoints(ckpt, [str(s) for s in suites], store, out_root=tmp_path / "img1", batch_size=5)
    # a sharded run that finds part of its images drawn already (as after a kill) keeps them and draws the rest
    shutil.copytree(tmp_path / "img1", tmp_path / "img2")
    pngs = sorted((tmp_path / "img2").rglob("*.png"))
    for p in pngs[1::2]:
        p.unlink()
    kept = {p: p.stat().st_mtime_ns for p in pngs[0::2]}
    for f in (tmp_path / "img2").rglob("results.jsonl"):
        f.unlink()
    torchrun(BIN / "harness", "eval", "--suite", ",".join(map(str, suites)), "--checkpoint", ckpt,
             "--store", tmp_path / "two.sqlite", "--out", tmp_path / "img2", "--batch-size", 5)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())   # not redrawn
    files1 = sorted(p.relative_to(tmp_path / "img1") for p in (tmp_path / "img1").rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(tmp_path / "img2") for p in (tmp_path / "img2").rglob("*") if p.is_file())
    assert files1 == files2 and len([f for f in files1 if f.suffix == ".png"]) == 36 + 5
    for f in files1:
        assert (tmp_path / "img1" / f).read_bytes() == (tmp_path / "img2" / f).read_bytes(), f
    m1, r1 = stored(tmp_path / "one.sqlite")
    m2, r2 = stored(tmp_path / "two.sqlite")
    assert m1 == m2 and len(m1) > 2
    assert len(r1) == len(r2) == 36 + 20
    with sqlite3.connect(tmp_path / "two.sqlite") as conn:
        worlds = [json.loads(p).get("world_size") for (p,) in conn.execute("SELECT provenance_json FROM evaluations")]
    assert worlds == [2, 2]


# --- docs/distributed.md: its commands parse (the train line is the one test_train_cli runs, at smaller size) ----

def doc_commands() -> list[str]:
    text = (ROOT / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def test_docs_commands_parse():
    from evaluators.suites import load_suite
    from harness.config import load_config
    from trainers.config import TrainConfig
    lines = [line for line in doc_commands() if "harness " in line and ("torchrun" in line or "accelerate" in line)]
    assert any(" train " in line for line in lines) and any(" eval " in line for line in lines)
    for line in lines:
        words = line.split()
        sub = words[words.index("harness") + 1:]
        if sub[0] == "train" and "--config" in sub:
            overrides = [w for w in sub[1:] if "=" in w and not w.startswith("-")]
            load_config(TrainConfig, str(ROOT / sub[sub.index("--config") + 1]), overrides)
        if sub[0] == "eval":
            for name in sub[sub.index("--suite") + 1].split(","):
                load_suite(name)


def test_docs_first_commands_run_as_written(tmp_path):
    """The doc's torchrun train + eval and its accelerate resume, exactly as written, from a repository-like folder:
    2 processes each (the accelerate line too: its checkpoint records world_size 2); the eval is sharded."""
    from harness.runs import RunDir
    from trainers.loop import read_trainer_state
    lines = [line for line in doc_commands() if line.startswith(("torchrun --standalone --nproc-per-node 2",
                                                                  "accelerate launch"))]
    assert len(lines) == 3, lines
    work = tmp_path / "repo"
    (work / "harness").mkdir(parents=True)
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "harness" / "assets").symlink_to(ROOT / "harness" / "assets")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    for var in ("HARNESS_STORE", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    for line in lines:
        out = subprocess.run(line, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, (line, out.stdout[-2000:], out.stderr[-2000:])
    run = RunDir(work / "runs" / "ht2")
    states = [read_trainer_state(c.trainer_state) for c in run.checkpoints()]
    assert [(s["world_size"], s["strategy"]) for s in states] == [(2, "ddp"), (2, "ddp")]   # steps 2 and 3
    with sqlite3.connect(work / "results" / "store.sqlite") as conn:
        rows = conn.execute("SELECT step, provenance_json FROM evaluations WHERE suite = 'shapes-geneval'").fetchall()
    assert [(step, json.loads(p)["world_size"]) for step, p in rows] == [(2, 2)]   # the eval line, sharded


def test_uneven_prompts_and_fsdp_are_clear_errors(monkeypatch):
    from harness import distributed
    from trainers.config import TrainConfig
    from trainers.loop import check_train_config
    cfg = TrainConfig.model_validate({**CONFIG, "distributed": {"strategy": "fsdp"}})
    check_train_config(cfg, for_training=False)   # fsdp for full fine-tuning is valid (tests/test_fsdp.py)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with pytest.raises(ValueError, match="prompts_per_step = 4 does not divide over 3 processes"):
        distributed.share(4, "rollout.prompts_per_step")
    assert [distributed.split_blocks(7)] == [(3, 5)]   # blocks 3, 2, 2: rank 1 takes 3..4


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
