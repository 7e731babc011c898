"""Build a `harness check` baseline for one checkpoint: evaluate it on the given suites with several
sampler seeds, take the mean as the value and k x the seed-to-seed std (at least a floor) as the tolerance.

    python benchmarks/make_baseline.py --checkpoint harness/assets/tiny_base.safetensors \
        --suites shapes-geneval --seeds 0 1 2 --out leaderboards/baselines/tiny.json
"""
import argparse
import tempfile
from pathlib import Path

from evaluators.run import evaluate_checkpoints, weights_hash
from harness.store import ResultsStore
from leaderboards.check import baseline_from_frame, write_baseline


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--suites", nargs="+", default=["shapes-geneval"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--k", type=float, default=3.0)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "store.sqlite") as store:
        for seed in a.seeds:
            evaluate_checkpoints(a.checkpoint, a.suites, store, backbone=a.backbone, out_root=Path(tmp) / "img",
                                 batch_size=a.batch_size, seed=seed)
        frame = store.latest_metrics()
        baseline = baseline_from_frame(frame, weights_hash(a.checkpoint), k=a.k,
                                       floor={n: 2.0 for n in frame["name"] if str(n).startswith("dpg")})
    baseline["made_by"] = ("python benchmarks/make_baseline.py --checkpoint " + a.checkpoint + " --suites " + " ".join(a.suites)
                           + " --seeds " + " ".join(map(str, a.seeds)) + f" --k {a.k}")
    write_baseline(a.out, baseline)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
