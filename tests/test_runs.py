"""The run folder contract (harness/runs.py) and what goes through it: a LoRA checkpoint is scored with its adapter,
the train seed comes from the run's config, the report finds the images `harness eval` drew, and every command
example in `--help` runs."""
from __future__ import annotations

import re
import shlex

import pytest
import torch
import yaml
from typer.testing import CliRunner

from harness.backbones.lora import apply_lora
from harness.backbones.mmada import load_mmada
from harness.backbones.replicas import make_mmada_replica
from harness.cli import app, load_backbone
from harness.runs import RunDir, checkpoint_of
from harness.store import ResultsStore

runner = CliRunner()

TRAIN_YAML = """
name: runs-test
seed: 3
steps: 1
backbone:
  checkpoint: ""
  options: {d_model: 32, n_layers: 1, n_heads: 2, mlp_hidden: 64}
rollout: {prompts_per_step: 2, group_size: 2, sampler: {steps: 4}}
method: {name: grpo, inner_iterations: 1}
reward: {shapes-geneval-partial: 1.0}
checkpoint: {every: 1, eval_suite: null}
tensorboard: false
"""

SUITE_YAML = """
name: runs-suite
version: 1
backbones: [tiny]
prompts: {kind: shapes, tags: [single_object, colors], max_prompts_per_tag: 1}
images_per_prompt: 2
sampler: {steps: 2, cfg: 1.0}
evaluators: [shapes-geneval]
layout: geneval
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def harness(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "train.yaml").write_text(TRAIN_YAML)
    (root / "suite.yaml").write_text(SUITE_YAML)
    # the folder's name says seed7; the run's seed is 3: the name must not be read
    result = harness("train", "--config", root / "train.yaml", "--run-dir", root / "seed7")
    assert result.exit_code == 0, result.output
    return root


def test_run_dir_finds_its_checkpoints_method_and_seed(run):
    r = RunDir(run / "seed7")
    assert [c.step for c in r.checkpoints()] == [1]
    assert r.method() == "grpo" and r.train_seed() == 3
    ckpt = checkpoint_of(r.checkpoints()[0].path / "model.safetensors")
    assert ckpt is not None and ckpt.step == 1 and ckpt.run.path == r.path
    assert checkpoint_of(run / "train.yaml") is None


def test_eval_of_a_run_records_the_seed_of_its_config_and_the_report_shows_its_images(run, tmp_path):
    store, out = tmp_path / "store.sqlite", tmp_path / "images"
    for source in (["--run", run / "seed7"], ["--checkpoint", "harness/assets/tiny_base.safetensors"]):
        result = harness("eval", "--suite", run / "suite.yaml", *source, "--store", store, "--out", out,
                         "--device", "cpu")
        assert result.exit_code == 0, result.output
    with ResultsStore(store, readonly=True) as s:
        frame = s.latest_metrics()
        trained = frame[frame["step"] == 1].iloc[0]
        assert trained["method"] == "grpo" and trained["provenance"]["train_seed"] == 3
        from leaderboards.report import image_grids
        grids, without = image_grids(s, frame)
    assert grids and not without, without
    assert grids[0].columns[0] != grids[0].columns[-1] and len(grids[0].columns) == 2   # base, then step 1
    # the gain over the base is the paired difference of the same images' judgements, with its error bar
    from leaderboards.gain import gains_over_base
    with ResultsStore(store, readonly=True) as s:
        [gain] = gains_over_base(s)
        n_images = len(s.records_for(int(trained["evaluation_id"]), "shapes-geneval"))
    assert gain.step == 1 and gain.method == "grpo" and gain.n_images == n_images > 0
    assert gain.gain == pytest.approx(gain.value - gain.base, abs=1e-12) and gain.stderr >= 0
    printed = harness("leaderboard", "--store", store, "--out", tmp_path / "lb.md")
    assert printed.exit_code == 0 and f"gain {gain.gain:+.3f} ± {gain.stderr:.3f}" in printed.output
    assert "## Gain over the base model" in (tmp_path / "lb.md").read_text()
    assert "(s.e. " in (tmp_path / "lb.md").read_text()     # one training seed: the eval's own error bar is shown
    html = tmp_path / "report.html"
    assert harness("leaderboard", "--store", store, "--out", html, "--format", "html").exit_code == 0
    assert html.read_text().count("data:image/png;base64") >= 4
    assert "without images" not in html.read_text()


@torch.no_grad()
def test_a_lora_checkpoint_of_mmada_is_loaded_with_its_adapter(tmp_path):
    base_dir = make_mmada_replica(tmp_path / "mmada", seed=1)
    bb = load_mmada(base_dir, dtype="float32", resolution=64)
    prompts = bb.tokenize(["a red cube"])
    codes = torch.full((1, 16), -1)
    base = bb.image_logits(prompts, codes)
    apply_lora(bb, r=2, alpha=4, dropout=0.0, targets=list(bb.lora_targets))
    for name, p in bb.module.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    adapted = bb.image_logits(prompts, codes)
    ckpt = RunDir(tmp_path / "run").checkpoint_path(5)
    ckpt.mkdir(parents=True)
    bb.save(ckpt / "adapter.safetensors")
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (ckpt / "config.yaml").write_text(yaml.safe_dump({
        "seed": 0, "backbone": {"name": "mmada", "checkpoint": str(base_dir), "dtype": "float32",
                                "options": {"resolution": 64}, "lora": {"r": 2, "alpha": 4}}}))
    loaded = load_backbone("mmada", str(ckpt))
    got = loaded.image_logits(prompts, codes)
    torch.testing.assert_close(got, adapted)
    assert (got - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="trained on backbone 'mmada'"):
        load_backbone("tiny", str(ckpt))


def help_examples(command: list[str]) -> list[str]:
    text = harness(*command, "--help").output
    return [m.group(1) for line in text.splitlines() if (m := re.match(r"^\s*(?:Example: )?harness (\w.*)$", line))]


def test_every_help_example_runs(run, tmp_path, monkeypatch):
    """The examples of `--help` parse and run (on tiny stand-ins where they name files a user would have)."""
    monkeypatch.chdir(tmp_path)
    # the files the examples name: a run folder with a checkpoint, the shipped configs and suites
    import shutil
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "configs", tmp_path / "configs")
    shutil.copytree(repo / "evaluators" / "suites", tmp_path / "evaluators" / "suites")
    shutil.copytree(repo / "leaderboards" / "baselines", tmp_path / "leaderboards" / "baselines")
    checked = 0
    for command in (["train"], ["validate"], ["generate"]):
        for example in help_examples(command):
            argv = shlex.split(example)
            if argv[0] == "train":    # the shipped config on the tiny stand-in, one step
                argv = [a.replace("configs/tiny/ht_grpo.yaml", str(run / "train.yaml")) for a in argv]
                if "--resume" in argv:
                    shutil.copytree(run / "seed7", tmp_path / "runs" / "tiny-ht-grpo")
                    argv[argv.index("--steps") + 1] = "2"
                else:
                    argv[argv.index("--steps") + 1] = "1"
                    argv += ["--run-dir", "runs/fresh"]
            result = harness(*argv)
            assert result.exit_code == 0, (example, result.output)
            checked += 1
    assert checked >= 4


def test_scoring_during_training_and_eval_of_the_run_draw_and_score_once(run, tmp_path):
    """What `make demo` does: the checkpoint scored while training is not drawn or scored again by `harness eval
    --run` into the same store and image root."""
    store = tmp_path / "store.sqlite"
    result = harness("train", "--config", run / "train.yaml", "--run-dir", tmp_path / "r",
                     f"checkpoint.eval_suite={run / 'suite.yaml'}", f"checkpoint.eval_store={store}")
    assert result.exit_code == 0, result.output
    images = sorted(p for p in (tmp_path / "r" / "eval").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in images]
    result = harness("eval", "--suite", run / "suite.yaml", "--run", tmp_path / "r", "--store", store,
                     "--out", tmp_path / "r" / "eval", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted((tmp_path / "r" / "eval").rglob("*.png")) == images
    assert [p.stat().st_mtime_ns for p in images] == stamps
    with ResultsStore(store, readonly=True) as s:
        assert s.conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 1


def test_the_method_comparison_scores_with_the_protocol_of_harness_eval(run, tmp_path, monkeypatch):
    """benchmarks/compare_methods.py goes through evaluate_checkpoints: its number for a checkpoint is the number
    `harness eval` gives that checkpoint (once three protocols gave the base 0.53, 0.555 and 0.52)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("compare_methods", Path(__file__).parent.parent / "benchmarks" / "compare_methods.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    monkeypatch.setattr(compare, "EVAL_SUITES", [str(run / "suite.yaml")])
    job = dict(out=str(tmp_path), method="grpo", seed=5, steps=1, prompts=2, group=2, lr=1e-4, beta=0.01,
               device="cpu", threads=1, max_seconds=0, rollout_dtype="float32", save_checkpoint=True,
               method_options={"inner_iterations": 1, "sampler": {"steps": 4}})
    result = compare.run_one(job)
    assert "error" not in result, result.get("error")
    [ckpt] = RunDir(tmp_path / "grpo_seed5").checkpoints(resumable=False)
    assert ckpt.run.method() == "grpo" and ckpt.run.train_seed() == 5
    store = tmp_path / "eval.sqlite"
    out = harness("eval", "--suite", run / "suite.yaml", "--checkpoint", ckpt.path, "--store", store,
                  "--out", tmp_path / "images", "--device", "cpu")
    assert out.exit_code == 0, out.output
    with ResultsStore(store, readonly=True) as s:
        frame = s.latest_metrics()
    assert dict(zip(frame["name"], frame["value"])) == result["eval"] and result["eval"]


def test_the_pixels_scored_in_training_are_the_pixels_eval_saves(run, tmp_path):
    """One codes -> uint8 conversion (harness.samples): a rollout's Sample image equals the PNG evaluate() wrote
    for the same prompt, seed and global index."""
    import numpy as np
    from PIL import Image
    from evaluators.run import evaluate_checkpoints, run_dir, weights_hash
    from evaluators.suites import index_stride, load_suite, sampler_for, suite_prompts
    from harness import sampling
    from harness.backbones.tiny import DEFAULT_CHECKPOINT, load_tiny
    from trainers.loop import to_samples
    suite = load_suite(str(run / "suite.yaml"))
    with ResultsStore(tmp_path / "s.sqlite") as store:
        evaluate_checkpoints(DEFAULT_CHECKPOINT, suite, store, out_root=tmp_path / "img")
    bb = load_tiny()
    prompts = suite_prompts(suite)
    p, j = prompts[-1], 1
    rollout = sampling.sample(bb, bb.tokenize([p.metadata["prompt"]]), sampler_for(suite, "tiny"), seed=suite.seed,
                              indices=[p.index * index_stride(prompts) + j])
    [sample] = to_samples(bb, rollout.codes, [p.metadata], step=0)
    saved = run_dir(tmp_path / "img", suite, weights_hash(DEFAULT_CHECKPOINT)) / p.prompt_id / "samples" / f"{j:04d}.png"
    assert np.array_equal(sample.image, np.array(Image.open(saved).convert("RGB")))
    assert np.array_equal(sample.codes, rollout.codes[0].numpy())
