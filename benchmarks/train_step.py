"""Seconds per training step, forward passes per update and rollouts/s for each method (tiny, CPU).

    python benchmarks/train_step.py [--steps 2] [--threads 2] [--rollout-dtype bfloat16] [--loss-dtype bfloat16]
"""
import argparse

import torch

from trainers.config import TrainConfig
from trainers.loop import build_trainer, train_step

METHODS = ["ht-grpo", "grpo", "maskgrpo", "tracegrpo", "diffu-grpo"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rollout-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--loss-dtype", default="float32", choices=["float32", "bfloat16"], help="pi / pi_old / pi_ref passes")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"8 prompts x G=8 rollouts, K=4, 12 sampler steps, {a.threads} threads, rollouts in {a.rollout_dtype}, "
          f"updates in {a.loss_dtype}")
    print("| method | s/step | rollout s | update s | forward passes / update | rollouts/s | train tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in METHODS:
        tr = build_trainer(TrainConfig(method={"name": m}, rollout={"dtype": a.rollout_dtype},
                                      loss={"dtype": a.loss_dtype}, checkpoint={"eval_suite": None}, tensorboard=False))
        rows = [train_step(tr, s) for s in range(a.steps)]
        avg = {k: sum(r[k] for r in rows) / len(rows) for k in ("step_s", "rollout_s", "train_s", "forward_passes_per_update",
                                                                 "rollouts_per_s", "train_tokens_per_s")}
        print(f"| {m} | {avg['step_s']:.2f} | {avg['rollout_s']:.2f} | {avg['train_s']:.2f} | "
              f"{avg['forward_passes_per_update']:.0f} | {avg['rollouts_per_s']:.1f} | {avg['train_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
