"""Smoke runs of the issue-18 speed benchmarks end to end (benchmarks/ml_cache.py, scorer_speed.py,
compile_speed.py): the same code paths as their CPU / GPU sizes at toy widths, asserting what makes a speed
number meaningful (the fast path computes what the slow path computes), not the speeds."""
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ml_cache_smoke(tmp_path):
    ml_cache = script("ml_cache")
    assert ml_cache.main(["--size", "smoke", "--out", str(tmp_path), "--repeats", "1", "--check-steps", "6"]) == 0
    out = json.loads((tmp_path / "ml_cache.json").read_text())
    # the cache's code path with nothing reused gives the uncached codes exactly (float32 CPU)
    assert [c["what"] for c in out["checks"]] == ["cache none", "ml-cache, every step a refresh",
                                                  "ml-cache, cached steps recompute every position"]
    assert all(c["identical"] and c["codes_differ"] == 0.0 for c in out["checks"])
    rows = out["rows"]
    assert rows[0]["what"].startswith("uncached") and rows[0]["codes_differ"] == 0.0
    cached = [r for r in rows if r["what"].startswith("ml-cache")]
    assert cached and all(r["seconds"] > 0 for r in rows)
    # smoke: 12 steps, warm-up int(3.6) = 3 -> refreshes at 0-3 and 8; the prediction is what the plan leaves
    assert cached[0]["refreshes"] == 5 and 1.5 < cached[0]["predicted"] < 12 / 5
    assert rows[-1]["what"].startswith("for scale") and rows[-1]["codes_differ"] > 0.5
    assert "| uncached (preset lumina-dimoo) |" in (tmp_path / "ml_cache.md").read_text()


def test_ml_cache_prediction_counts_the_padded_batch():
    import tempfile

    import torch

    from harness.backbones.llada import ml_cache_count
    from harness.sampling import sampler_config
    ml_cache = script("ml_cache")
    size = ml_cache.SIZES["smoke"]
    with tempfile.TemporaryDirectory() as tmp:
        bb = ml_cache.build(size, torch.device("cpu"), Path(tmp))
    prompts = bb.tokenize(ml_cache.PROMPTS[:2])       # prompts of two lengths: cond and uncond rows differ
    cfg = sampler_config("lumina-dimoo", steps=10, cache="ml-cache", cache_warmup_ratio=0.0, cache_refresh_interval=5)
    from harness.backbones.base import concat_prompts
    _, key_mask, _ = bb.build_inputs(concat_prompts(prompts, bb.uncond(2)), torch.full((4, 16), -1))
    padded, counts = key_mask.shape[1], [ml_cache_count(int(x), 0.1) for x in key_mask.sum(1).tolist()]
    assert len(set(counts)) > 1
    # refreshes at steps 0 and 5; 8 cached steps each computing the widest row's count over the padded length
    assert ml_cache.predicted_speedup(bb, cfg, prompts) == pytest.approx(10 * padded / (2 * padded + 8 * max(counts)))


def test_scorer_speed_smoke_batched_equals_one_at_a_time(tmp_path):
    scorer_speed = script("scorer_speed")
    only = "clip-colors,imagereward,hpsv3"
    assert scorer_speed.main(["--smoke", "--only", only, "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "scorer_speed.json").read_text())
    assert [r["scorer"] for r in out["rows"]] == only.split(",")
    for r in out["rows"]:
        assert r["agree"] and r["max_abs_diff"] <= 1e-4 * r["max_abs_score"], r
        assert r["max_abs_score"] > 0 and r["batch"] == 4                     # 4 smoke images, one batch
        assert r["one"]["images_per_s"] > 0 and r["batched"]["images_per_s"] > 0
    assert "| clip-colors |" in (tmp_path / "scorer_speed.md").read_text()


def test_scorer_speed_fails_when_batched_differs(tmp_path, monkeypatch):
    scorer_speed = script("scorer_speed")
    real = scorer_speed.build_clip_colors

    def skewed(smoke, device, **kw):
        score, model, note, batch = real(smoke, device, **kw)
        return (lambda images: score(images) + (len(images) > 1)), model, note, batch
    monkeypatch.setitem(scorer_speed.BUILDERS, "clip-colors", skewed)
    assert scorer_speed.main(["--smoke", "--only", "clip-colors", "--out", str(tmp_path)]) == 1
    assert "DIFFER" in (tmp_path / "scorer_speed.md").read_text()


def test_scorer_speed_detector_smoke(tmp_path):
    pytest.importorskip("mmcv._ext", reason="mmcv without compiled ops (run `make mmdet`)")
    scorer_speed = script("scorer_speed")
    assert scorer_speed.main(["--smoke", "--only", "geneval-detector", "--images", "2", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "scorer_speed.json").read_text())["rows"]
    assert row["agree"] and row["batch"] == 4 and row["max_abs_score"] > 0


def test_compile_speed_smoke(tmp_path):
    compile_speed = script("compile_speed")
    assert compile_speed.main(["--smoke", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "compile_speed.json").read_text())["rows"]
    assert row["dtype"] == "float32" and row["eager_s"] > 0 and row["compiled_s"] > 0 and row["compile_s"] > 0
    assert row["identical"] == (row["codes_differ"] == 0.0)
