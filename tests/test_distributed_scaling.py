"""benchmarks/distributed_scaling.py runs end to end at smoke size (1 and 2 torchrun processes) and finds the
guaranteed equalities (rewards and stored eval metrics equal at 1 and 2 processes); it exits non-zero if not."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scaling_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed_scaling.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["procs"] for r in rows] == [1, 2]
    assert all(r["rewards_equal"] and r["metrics_equal"] for r in rows)
    assert rows[0]["eval_images"] == rows[1]["eval_images"] > 0
    assert rows[0]["rollouts_efficiency"] == 1.0 and rows[1]["rollouts_per_s"] > 0
