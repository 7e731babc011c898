"""benchmarks/real_size.py runs its smoke size end to end (the same code path as the CPU and GPU sizes): random
8B-shaped backbones behind the real adapters, rollouts, a LoRA and a full fine-tuning train step, the tiny
default's rows, and a table whose MFU is relative to the matmul peak measured in the same run."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_real_size_smoke(tmp_path, capsys):
    import real_size
    assert real_size.main(["--size", "smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "real_size.json").read_text())
    assert data["peaks"]["float32"] > 0 and data["peaks"]["bfloat16"] > 0
    rows = data["rows"]
    whats = [r["what"] for r in rows]
    assert any(w.startswith("rollout batch 2") for w in whats)
    assert "ht-grpo step, LoRA r=128" in whats and "ht-grpo step, full FT" in whats
    assert {r["backbone"].split()[0] for r in rows} == {"mmada", "lumina-dimoo", "tiny"}
    for r in rows:
        assert r["flops"] > 0 and r["mfu"] > 0, r          # no bound on speed: it is a ratio of wall clocks
    text = (tmp_path / "real_size.md").read_text()
    assert "matmul peak measured in this run" in text and "| MFU |" in text
