"""Writes the prompt file of this diagnostic: the eval split's prompts, each tag repeated so that a uniform
draw from the file follows the tiny config's tag weights. Run from the repository root:
    python leaderboards/experiments/2026-11-28_diagnostic_train_on_eval_prompts/make_prompts.py runs/eval_split_prompts.jsonl
"""
import json
import sys

from harness.shapes.prompts import eval_prompts

TAG_WEIGHTS = {"single_object": 0.5, "two_object": 1.0, "counting": 2.0, "colors": 0.5, "position": 2.0, "color_attr": 2.0}

with open(sys.argv[1], "w") as f:
    for tag, weight in TAG_WEIGHTS.items():
        pool = eval_prompts(tag)
        for i in range(round(weight * 400)):
            f.write(json.dumps(pool[i % len(pool)]) + "\n")
