"""Rollouts/s of `harness train` and images/s of `harness eval` against the number of processes, and the scaling
efficiency (issue 17 item 7). Every process count runs the same command under torchrun, so launch, rendezvous
and gathers are in the numbers.

    python benchmarks/distributed_scaling.py                 # CPU: 1 and 2 processes, 1 thread each, ~4 min
    python benchmarks/distributed_scaling.py --smoke         # tests: a small model and suite, the same path
    python benchmarks/distributed_scaling.py --procs 1,2,4,8 --threads 8 --out DIR   # a GPU node (one GPU a rank)

Training: configs/tiny/ht_grpo.yaml (8 prompts x G=4 a step), `--steps` steps, checkpoint scoring off; the rates
are the mean over the steps after the first (warm-up) of the log line's rollouts_per_s (all ranks' rollouts over
the slowest rank's rollout time) and of the step time. Evaluation: `harness eval --suite shapes-geneval` on the
1-process run's last checkpoint; images/s = images drawn / wall time of the command (start-up included, which
is what a user waits for). Efficiency = rate(N) / (N x rate(1)). Every run also checks what is guaranteed: the
first step's rewards (same weights: the same rollouts) and the eval's stored metrics (same checkpoint) equal the
1-process ones exactly. Later steps start from weights that differ from the 1-process run's by float summation
order (~1e-7; docs/distributed.md): once such a difference flips one sampled token the rollouts differ, so the
table counts the steps whose rewards still equal the 1-process run's and does not require all of them.

On a CPU with C cores, N processes of T threads compete for the same cores: N x T <= C is the fair setting
(`--threads 1` with N <= 2 on the 2-core development box); the efficiency then measures the distributed
overhead (launch, gathers, the DDP all-reduce, rank 0's writes), not a speed-up from more hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, threads: int, *args) -> float:
    """Run `harness ARGS` under torchrun with n processes; its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", str(BIN / "harness"), *map(str, args)]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed ({' '.join(cmd)}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return time.time() - t0


def train_config(folder: Path, steps: int, smoke: bool) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / "ht_grpo.yaml").read_text())
    cfg.update(steps=steps, tensorboard=False)
    cfg.setdefault("checkpoint", {}).update(every=steps, eval_suite=None)
    if smoke:   # a 1-layer tiny model and 4 prompts x G=2
        cfg["backbone"] = {"name": "tiny", "checkpoint": "", "options": {"d_model": 32, "n_layers": 1, "n_heads": 2}}
        cfg["rollout"].update(prompts_per_step=4, group_size=2)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def eval_suite(folder: Path, smoke: bool) -> Path:
    suite = yaml.safe_load((ROOT / "evaluators" / "suites" / "shapes-geneval.yaml").read_text())
    if smoke:
        suite["prompts"]["max_prompts_per_tag"] = 2
        suite.update(images_per_prompt=2, min_images_per_tag=None, version="scaling-smoke")
        suite["sampler"]["steps"] = 4
    path = folder / "shapes-geneval.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def stored_metrics(path: Path) -> list:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT m.evaluator, m.name, m.value FROM metrics m ORDER BY m.evaluator, m.name").fetchall()


def measure(procs: list[int], threads: int, steps: int, smoke: bool, work: Path) -> list[dict]:
    config, suite = train_config(work, steps, smoke), eval_suite(work, smoke)
    rows, first = [], None
    for n in procs:
        run = work / f"run_{n}"
        train_wall = torchrun(n, threads, "train", "--config", config, "--run-dir", run)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        timed = lines[1:] or lines
        ckpt = (first or {}).get("ckpt") or sorted((run / "checkpoints").iterdir())[-1]
        store, images = work / f"eval_{n}.sqlite", work / f"images_{n}"
        eval_wall = torchrun(n, threads, "eval", "--suite", suite, "--checkpoint", ckpt, "--store", store,
                             "--out", images)
        row = {"procs": n, "threads": threads, "steps": len(lines),
               "rollouts_per_s": sum(x["rollouts_per_s"] for x in timed) / len(timed),
               "step_s": sum(x["step_s"] for x in timed) / len(timed),
               "train_wall_s": train_wall,
               "eval_images": sum(1 for _ in images.rglob("*.png")), "eval_wall_s": eval_wall,
               "rewards": [x["reward_mean"] for x in lines], "metrics": stored_metrics(store), "ckpt": ckpt}
        row["eval_images_per_s"] = row["eval_images"] / eval_wall
        first = first or row
        row["rewards_equal"] = row["rewards"][0] == first["rewards"][0]
        row["equal_steps"] = next((i for i, (a, b) in enumerate(zip(row["rewards"], first["rewards"])) if a != b),
                                  len(row["rewards"]))
        row["metrics_equal"] = row["metrics"] == first["metrics"]
        for key in ("rollouts_per_s", "eval_images_per_s"):
            row[key.replace("_per_s", "_efficiency")] = row[key] / (n * first[key])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| processes x threads | rollouts/s | efficiency | s / step | eval images/s | efficiency | "
           "step-1 rewards = 1 process | steps equal to 1 process | eval metrics = 1 process |",
           "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        out.append(f"| {r['procs']} x {r['threads']} | {r['rollouts_per_s']:.2f} | {r['rollouts_efficiency']:.0%} | "
                   f"{r['step_s']:.2f} | {r['eval_images_per_s']:.2f} ({r['eval_images']} in {r['eval_wall_s']:.0f} s) "
                   f"| {r['eval_images_efficiency']:.0%} | {'yes' if r['rewards_equal'] else 'NO'} | "
                   f"{r['equal_steps']} of {r['steps']} | "
                   f"{'yes' if r['metrics_equal'] else 'NO'} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated (1 first: the reference)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (OMP_NUM_THREADS)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="write scaling.md and scaling.json here")
    a = p.parse_args()
    procs = [int(x) for x in a.procs.split(",")]
    if procs[0] != 1:
        sys.exit("--procs must start with 1 (the reference every efficiency is relative to)")
    steps = 2 if a.smoke else a.steps
    work = Path(tempfile.mkdtemp(prefix="harness_scaling_"))
    try:
        rows = measure(procs, a.threads, steps, a.smoke, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = (f"{os.cpu_count()} CPUs, load average {load:.1f} at the end; {'smoke' if a.smoke else 'tiny default'}; "
            f"train {steps} steps (rates over steps 2..), eval shapes-geneval")
    text = head + "\n\n" + table(rows)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "scaling.md").write_text(text + "\n")
        (a.out / "scaling.json").write_text(json.dumps([{k: v for k, v in r.items() if k not in ("metrics", "ckpt")}
                                                        for r in rows], indent=1))
    if not all(r["rewards_equal"] and r["metrics_equal"] for r in rows):
        sys.exit("results differ between process counts (see the table)")


if __name__ == "__main__":
    main()
