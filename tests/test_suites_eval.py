"""Suites and the eval runner: YAML validation, the official layouts, caching, resuming, batch independence.

Everything runs a one-layer random tiny model for 2 sampler steps on 2 prompts x 2 images (or 2 DPG grids)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from evaluators import run as runner
from evaluators.suites import (images_per_tag_rule, load_suite, prompt_metadata, sampler_for, suite_prompts,
                               suites_for_backbone)
from harness import registry, sampling
from harness.backbones.tiny import load_tiny
from harness.config import ConfigError
from harness.shapes.prompts import eval_prompts
from harness.store import ResultsStore

REAL_SAMPLE = sampling.sample
SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

GENEVAL_SUITE = """
name: t-geneval
version: 3
backbones: [tiny]
prompts: {kind: shapes, tags: [single_object, counting], split: eval, max_prompts_per_tag: 1}
images_per_prompt: 2
seed: 5
sampler: {steps: 2, cfg: 1.0}
resolution: 256
evaluators: [shapes-geneval, shapes-quality]
layout: geneval
"""
DPG_SUITE = """
name: t-dpg
version: 1
backbones: [tiny]
prompts: {kind: shapes-dense, split: eval, count: 2, seed: 1}
images_per_prompt: 4
sampler: {steps: 2, cfg: 1.0}
evaluators: [shapes-dpg]
layout: dpg
"""


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matmuls on 2 shared busy cores run ~100x slower with 2 spinning torch threads than with 1
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[object, Path]:
    bb = load_tiny("", d_model=32, n_layers=1, n_heads=2, mlp_hidden=64)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    bb.save(path)
    return load_tiny(path), path


def count_sampled(monkeypatch, fail_after_calls: int | None = None) -> list[int]:
    """Record the global indices every sampler call draws; optionally crash on a later call."""
    drawn: list[int] = []
    real = REAL_SAMPLE

    def wrapped(backbone, prompts, cfg, *, seed, indices=None):
        if fail_after_calls is not None and len(drawn) >= fail_after_calls:
            raise RuntimeError("simulated crash")
        out = real(backbone, prompts, cfg, seed=seed, indices=indices)
        drawn.extend(indices)
        return out
    monkeypatch.setattr(sampling, "sample", wrapped)
    return drawn


def run(bb, ckpt, suite, tmp_path, batch_size=4, store_name="store.sqlite", out="images"):
    with ResultsStore(tmp_path / store_name) as store:
        return runner.evaluate(bb, suite, checkpoint_path=ckpt, store=store, out_root=tmp_path / out,
                               batch_size=batch_size)


# --- suites ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    (("images_per_prompt: 2", "images_per_prompt: two"), "images_per_prompt"),
    (("max_prompts_per_tag: 1", "max_prompt_per_tag: 1"), "prompts.shapes.max_prompt_per_tag: unknown key"),
    (("tags: [single_object, counting]", "tags: [single_object, dense]"), "prompts.shapes.tags"),
    (("backbones: [tiny]", "backbones: [tinyy]"), "Did you mean 'tiny'"),
    (("layout: geneval", "layout: grid"), "layout"),
    (("sampler: {steps: 2, cfg: 1.0}", "sampler: {steps: 0}"), "sampler.steps"),
    (("kind: shapes,", "kind: coco,"), "prompts"),
])
def test_suite_errors_name_the_key(tmp_path, change, key):
    path = write(tmp_path, GENEVAL_SUITE.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_dpg_layout_needs_four_images(tmp_path):
    with pytest.raises(ConfigError, match="images_per_prompt: layout 'dpg'"):
        load_suite(write(tmp_path, DPG_SUITE.replace("images_per_prompt: 4", "images_per_prompt: 3")))


def test_shipped_suites_validate_and_meet_their_rules(monkeypatch):
    assert {"shapes-geneval", "shapes-dpg", "shapes-quality", "geneval", "dpg"} <= set(registry.names("suites"))
    for name in registry.names("suites"):
        suite = load_suite(name)
        assert suite.name == name and suite.version
    assert suites_for_backbone("tiny") == ["shapes-dpg", "shapes-geneval", "shapes-quality"]
    assert suites_for_backbone("mmada") == ["dpg", "geneval", "preference", "quality"]

    geneval = load_suite("shapes-geneval")
    prompts = suite_prompts(geneval)
    per_tag: dict[str, int] = {}
    for p in prompts:
        per_tag[p.metadata["tag"]] = per_tag.get(p.metadata["tag"], 0) + p.n_images
        assert p.n_images >= 4 and p.prompt_id == f"{p.index:05d}"
    assert len(per_tag) == 6 and min(per_tag.values()) >= 48
    # the small-tag rule by hand: single_object has 2 eval prompts -> 24 images each; big tags keep 4
    assert len(eval_prompts("single_object")) == 2
    rule = images_per_tag_rule(geneval, prompt_metadata(geneval))
    assert rule["single_object"] == 24 and rule["color_attr"] == 4
    assert rule["two_object"] == math.ceil(48 / len(eval_prompts("two_object")))

    dpg = suite_prompts(load_suite("shapes-dpg"))
    assert len(dpg) == 48 and all(p.n_images == 4 and p.metadata["tag"] == "dense" for p in dpg)
    assert {p.n_images for p in suite_prompts(load_suite("shapes-quality"))} == {8}
    # official suites: the sampler follows the backbone; evaluators not installed fail when run, not when listed
    assert sampler_for(load_suite("geneval"), "mmada") == sampling.PRESETS["mmada"]
    monkeypatch.delenv("HARNESS_MPLUG_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="mPLUG.*HARNESS_MPLUG_DIR"):   # the DPG judge without its weights
        runner.resolve_evaluators(load_suite("dpg"))
    try:   # where `make mmdet` ran, the mmdet backend resolves up to its model files; otherwise it says how to install
        runner.resolve_evaluators(load_suite("geneval"))
    except ImportError as e:
        assert "make mmdet" in str(e)
    except FileNotFoundError as e:     # no model files here (tests/test_mmdet_backend.py checks the case with files)
        assert "mask2former" in str(e) or "clip-vit-large-patch14" in str(e)
    # the preference scorers need only transformers: without weights they stop before any image, naming the file
    for var in ("HARNESS_DEQA_DIR", "HARNESS_HPS_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)
    for name, needs in (("quality", "DeQA"), ("preference", "HPS")):
        assert runner.image_source(load_suite(name)).name == "dpg"     # scored on the dpg suite's images
        with pytest.raises(FileNotFoundError, match=needs):
            runner.resolve_evaluators(load_suite(name))


def test_official_suites_read_the_official_files(monkeypatch):
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("../shared/reference (official GenEval / DPG prompt files) is not present")
    monkeypatch.setenv("HARNESS_DATA", str(SHARED_REFERENCE))
    geneval = suite_prompts(load_suite("geneval"))
    assert len(geneval) == 553 and sum(p.n_images for p in geneval) == 2212
    dpg = suite_prompts(load_suite("dpg"))
    assert len(dpg) == 1065 and {p.prompt_id for p in dpg} >= {"0", "partiprompts1"}
    monkeypatch.setenv("HARNESS_DATA", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="harness data fetch geneval"):
        suite_prompts(load_suite("geneval"))


# --- running ------------------------------------------------------------------------------------------------------

def test_geneval_layout_round_trip_and_cache(tmp_path, checkpoint, monkeypatch):
    bb, ckpt = checkpoint
    suite = load_suite(write(tmp_path, GENEVAL_SUITE))
    drawn = count_sampled(monkeypatch)
    metrics = run(bb, ckpt, suite, tmp_path)
    assert sorted(drawn) == [0, 1, 2, 3]              # prompt i, image j -> i * 2 + j
    root = tmp_path / "images" / "t-geneval" / f"{runner.provenance.checkpoint_hash(ckpt)[:12]}-v3"
    assert sorted(p.name for p in root.iterdir()) == ["00000", "00001", "protocol.json", "results.jsonl"]
    prompts = suite_prompts(suite)
    for p in prompts:
        assert json.loads((root / p.prompt_id / "metadata.jsonl").read_text()) == p.metadata
        assert sorted(f.name for f in (root / p.prompt_id / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert [p.metadata["tag"] for p in prompts] == ["single_object", "counting"]
    with Image.open(root / "00000" / "samples" / "0001.png") as im:
        assert im.size == (256, 256) and im.mode == "RGB"
    results = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert [r["filename"] for r in results] == ["00000/samples/0000.png", "00000/samples/0001.png",
                                                "00001/samples/0000.png", "00001/samples/0001.png"]
    assert 0 <= metrics["geneval_overall"] <= 1 and "stray_cell_fraction" in metrics

    with ResultsStore(tmp_path / "store.sqlite") as store:
        (ev,) = [store.get_evaluation(i) for (i,) in store.conn.execute("SELECT id FROM evaluations")]
        assert ev["status"] == "complete" and ev["suite_version"] == "3" and ev["seed"] == 5
        assert ev["provenance"]["sampler"]["steps"] == 2 and ev["provenance"]["checkpoint_hash"] == ev["checkpoint_hash"]
        assert "torch" in ev["provenance"]["versions"] and "git_commit" in ev["provenance"]
        assert len(store.records_for(ev["id"], "shapes-geneval")) == 4
        # the same images scored from the folder, as images made elsewhere, give the same numbers
        assert runner.evaluate_images_dir(root, suite, store, results_path=tmp_path / "r.jsonl") == metrics

    # a second run draws nothing and returns the stored numbers; a new store re-scores the cached images only
    assert run(bb, ckpt, suite, tmp_path) == metrics
    assert run(bb, ckpt, suite, tmp_path, store_name="other.sqlite") == metrics
    assert sorted(drawn) == [0, 1, 2, 3]
    # a seed override draws its own images into its own folder
    with ResultsStore(tmp_path / "store.sqlite") as store:
        runner.evaluate(bb, suite, checkpoint_path=ckpt, store=store, out_root=tmp_path / "images", seed=9)
    assert sorted(drawn) == [0, 0, 1, 1, 2, 2, 3, 3]
    other = root.with_name(root.name + "-s9")
    assert (other / "00000" / "samples" / "0000.png").read_bytes() != (root / "00000" / "samples" / "0000.png").read_bytes()
    # another seed under the same version is refused instead of mixing images
    with pytest.raises(ValueError, match="seed differ.*Bump `version`"):
        run(bb, ckpt, load_suite(write(tmp_path, GENEVAL_SUITE.replace("seed: 5", "seed: 6"))), tmp_path)


def test_interrupted_eval_resumes_and_images_ignore_batch_size(tmp_path, checkpoint, monkeypatch):
    bb, ckpt = checkpoint
    suite = load_suite(write(tmp_path, GENEVAL_SUITE))
    drawn = count_sampled(monkeypatch, fail_after_calls=3)   # batch size 1: three images, then a crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(bb, ckpt, suite, tmp_path, batch_size=1, out="resumed")
    assert sorted(drawn) == [0, 1, 2]
    drawn = count_sampled(monkeypatch)
    resumed = run(bb, ckpt, suite, tmp_path, batch_size=1, out="resumed")
    assert drawn == [3]                                       # only the missing image
    with ResultsStore(tmp_path / "store.sqlite") as store:    # the crashed evaluation was resumed, not duplicated
        assert tuple(store.conn.execute("SELECT COUNT(*), MIN(status) FROM evaluations").fetchone()) == (1, "complete")

    reference = run(bb, ckpt, suite, tmp_path, batch_size=3, out="reference", store_name="ref.sqlite")
    files = sorted((tmp_path / "resumed").rglob("*.png"))
    assert len(files) == 4 and reference == resumed
    for f in files:
        twin = tmp_path / "reference" / f.relative_to(tmp_path / "resumed")
        assert f.read_bytes() == twin.read_bytes()


def test_dpg_layout_writes_grids_and_rescores_the_same(tmp_path, checkpoint):
    bb, ckpt = checkpoint
    suite = load_suite(write(tmp_path, DPG_SUITE))
    metrics = run(bb, ckpt, suite, tmp_path, batch_size=3)     # a batch boundary inside a grid
    root = next((tmp_path / "images" / "t-dpg").iterdir())
    grids = sorted((root / "grids").iterdir())
    assert sorted(g.stem for g in grids) == sorted(p.prompt_id for p in suite_prompts(suite))
    assert all(g.stem.startswith("shapes-") for g in grids)
    with Image.open(grids[0]) as im:
        assert im.size == (512, 512)
    assert 0 <= metrics["dpg_overall"] <= 100
    with ResultsStore(tmp_path / "store.sqlite") as store:
        assert runner.evaluate_images_dir(root / "grids", suite, store) == metrics
        (root / "grids" / "stray.png").write_bytes(grids[0].read_bytes())
        with pytest.raises(ValueError, match="stray.png"):
            runner.evaluate_images_dir(root / "grids", suite, store)


def test_evaluate_refuses_wrong_backbone_and_resolution(tmp_path, checkpoint):
    bb, ckpt = checkpoint
    with pytest.raises(ValueError, match="backbones \\['mmada'"):
        run(bb, ckpt, load_suite(write(tmp_path, GENEVAL_SUITE.replace("backbones: [tiny]", "backbones: [mmada]"))),
            tmp_path)
    with pytest.raises(ValueError, match="resolution 512"):
        run(bb, ckpt, load_suite(write(tmp_path, GENEVAL_SUITE.replace("resolution: 256", "resolution: 512"))), tmp_path)
    assert not (tmp_path / "images").exists()


def test_a_suite_can_score_another_suites_images_without_drawing(tmp_path, checkpoint, monkeypatch):
    """images_from: the second suite scores the first one's folder (no sampler call); a suite whose prompts,
    sampler or seed differ from its image source is refused, naming the field."""
    bb, ckpt = checkpoint
    source = write(tmp_path, DPG_SUITE, "source.yaml")
    first = run(bb, ckpt, load_suite(source), tmp_path)
    borrowed = DPG_SUITE.replace("name: t-dpg", "name: t-dpg-again") + f"images_from: {source}\n"
    drawn = count_sampled(monkeypatch)
    again = run(bb, ckpt, load_suite(write(tmp_path, borrowed, "again.yaml")), tmp_path)
    assert drawn == [] and again == first
    assert [d.name for d in (tmp_path / "images").iterdir()] == ["t-dpg"]

    for change, field in ((("seed: 1}", "seed: 2}"), "prompts"), (("steps: 2,", "steps: 3,"), "sampler"),
                          (("version: 1", "version: 1\nseed: 9"), "seed")):
        other = write(tmp_path, borrowed.replace(*change), "other.yaml")
        with pytest.raises(ValueError, match=f"takes its images from 't-dpg', but their {field} differ"):
            run(bb, ckpt, load_suite(other), tmp_path)
