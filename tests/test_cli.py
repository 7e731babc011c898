"""The `harness` CLI through Typer's CliRunner: listing, generating, evaluating a run, validating, fetching data,
the thin commands' argument mapping, clean errors with exit codes, and a light import."""
from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from harness.backbones.tiny import load_tiny
from harness.cli import app
from harness.store import ResultsStore

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_GENEVAL = REPO_ROOT.parent / "shared" / "reference" / "geneval"
SHARED_DPG = REPO_ROOT.parent / "shared" / "reference" / "dpg" / "prompts"
runner = CliRunner()

SUITE = """
name: cli-suite
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
    torch.set_num_threads(1)    # tiny models on busy shared cores: one thread is much faster
    yield
    torch.set_num_threads(before)


def invoke(*args: str, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


def test_ls_lists_backbones_and_suites():
    result = invoke("ls")
    assert result.exit_code == 0, result.output
    backbones = result.output.split("methods:")[0]
    for name in ("tiny", "mmada", "lumina-dimoo"):
        assert f"  {name}\n" in backbones
    assert "shapes-geneval  v1  backbones: tiny" in result.output
    assert invoke("ls", "backbones").output.splitlines() == ["backbones:", "  lumina-dimoo", "  mmada", "  tiny"]
    bad = invoke("ls", "backbone")
    assert bad.exit_code == 2 and "Did you mean 'backbones'" in bad.output


def test_generate_writes_pngs(tmp_path):
    out = tmp_path / "one.png"
    result = invoke("generate", "--prompt", "a photo of a red circle", "--out", str(out), "--checkpoint", "",
                    "--steps", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.size == (256, 256) and im.format == "PNG"
    result = invoke("generate", "--prompt", "a photo of a red circle", "--out", str(tmp_path / "many.png"),
                    "--checkpoint", "", "--steps", "1", "--n", "3", "--seed", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("many-*.png")) == ["many-000.png", "many-001.png", "many-002.png"]
    result = invoke("generate", "--prompt", "a photo of a red circle", "--out", str(tmp_path / "grid.png"),
                    "--checkpoint", "", "--steps", "1", "--n", "3", "--grid", "--device", "cpu")
    with Image.open(tmp_path / "grid.png") as im:
        assert result.exit_code == 0 and im.size == (3 * 8 + 512, 3 * 8 + 512)   # 2 x 2 cells for 3 images, 8 px gutters
    bad = invoke("generate", "--prompt", "a photo of a unicorn", "--out", str(tmp_path / "u.png"), "--checkpoint", "")
    assert bad.exit_code == 1 and "unicorn" in bad.output and "Traceback" not in bad.output


def test_eval_a_run_folder_stores_every_step(tmp_path):
    suite = tmp_path / "cli-suite.yaml"
    suite.write_text(SUITE)
    first = tmp_path / "runs" / "r1" / "checkpoints" / "step_000010" / "model.safetensors"
    load_tiny("", d_model=32, n_layers=1, n_heads=2, mlp_hidden=64).save(first)
    (tmp_path / "runs" / "r1" / "checkpoints" / "step_000020").mkdir()
    shutil.copy(first, tmp_path / "runs" / "r1" / "checkpoints" / "step_000020" / "model.safetensors")
    (tmp_path / "runs" / "r1" / "checkpoints" / "step_000020" / "trainer_state.pt").write_bytes(b"optimizer")
    (tmp_path / "runs" / "r1" / "config.yaml").write_text("method: {name: ht-grpo}\n")
    store = tmp_path / "store.sqlite"
    result = invoke("eval", "--suite", str(suite), "--run", str(tmp_path / "runs" / "r1"), "--store", str(store),
                    "--out", str(tmp_path / "images"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "geneval_overall" in result.output
    with ResultsStore(store) as s:
        rows = s.conn.execute("SELECT run, step, method, status FROM evaluations ORDER BY step").fetchall()
        run = str(tmp_path / "runs" / "r1")
        assert [tuple(r) for r in rows] == [(run, 10, "ht-grpo", "complete"), (run, 20, "ht-grpo", "complete")]
        frame = s.metrics_frame()
        by_step = {step: dict(zip(g["name"], g["value"])) for step, g in frame.groupby("step")}
        assert by_step[10] == by_step[20] and "geneval_overall" in by_step[10]
    # both steps hold the same weights file (step 20 also a trainer state): one image folder, and step 20
    # reuses step 10's scores under its own row
    assert len(list((tmp_path / "images" / "cli-suite").iterdir())) == 1
    # one checkpoint folder of the run keeps its run, step and method too
    store2 = tmp_path / "store2.sqlite"
    result = invoke("eval", "--suite", str(suite), "--checkpoint", str(tmp_path / "runs" / "r1" / "checkpoints" / "step_000020"),
                    "--store", str(store2), "--out", str(tmp_path / "images"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    with ResultsStore(store2) as s:
        rows = s.conn.execute("SELECT run, step, method FROM evaluations").fetchall()
        assert [tuple(r) for r in rows] == [(run, 20, "ht-grpo")]
    # key=value overrides change the suite for this run (and its stored protocol): other evaluators here
    result = invoke("eval", "--suite", str(suite), "--checkpoint", str(first), "--store", str(tmp_path / "s3.sqlite"),
                    "--out", str(tmp_path / "images"), "--device", "cpu", "evaluators=[shapes-quality]")
    assert result.exit_code == 0, result.output
    assert "stray_cell_fraction" in result.output and "geneval_overall" not in result.output


def test_unknown_names_give_did_you_mean_and_exit_2(tmp_path, monkeypatch):
    result = invoke("eval", "--suite", "shapes-genevl", "--checkpoint", str(tmp_path / "x.safetensors"))
    assert result.exit_code == 2
    assert "Did you mean 'shapes-geneval'" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = invoke("eval", "--suite", "shapes-geneval", "--checkpoint", "x", "--backbone", "tinny")
    assert result.exit_code == 2 and "Did you mean 'tiny'" in result.output
    result = invoke("eval", "--suite", "shapes-geneval", "--checkpoint", "x", "--images", str(tmp_path))
    assert result.exit_code == 2 and "exactly one of" in result.output
    result = invoke("data", "fetch", "genevl")
    assert result.exit_code == 2 and "Did you mean 'geneval'" in result.output
    # an official suite whose judge has no weights here stops before loading any model, naming what to fetch
    monkeypatch.delenv("HARNESS_MPLUG_DIR", raising=False)
    result = invoke("eval", "--suite", "dpg", "--checkpoint", "x", "--backbone", "mmada")
    assert result.exit_code == 1 and "HARNESS_MPLUG_DIR" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_eval_all_skips_the_suites_that_cannot_run_here_and_says_why(tmp_path, monkeypatch):
    """On a real backbone without model files every suite is skipped with its reason and nothing starts;
    naming one of them instead fails on its reason."""
    for var in ("HARNESS_GENEVAL_MODELS", "HARNESS_CLIP_DIR", "HARNESS_DEQA_DIR", "HARNESS_HPS_CHECKPOINT",
                "HARNESS_MPLUG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "no-data"))
    result = invoke("eval", "--suite", "all", "--images", str(tmp_path), "--backbone", "mmada")
    assert result.exit_code == 1 and "Traceback" not in result.output
    skipped = [line.split(":")[0] for line in result.output.splitlines() if line.startswith("skipping suite")]
    assert skipped == ["skipping suite dpg", "skipping suite geneval", "skipping suite preference", "skipping suite quality"]
    assert "none of the suites of backbone 'mmada' can run here" in result.output
    assert "DeQA" in result.output and "mPLUG" in result.output
    named = invoke("eval", "--suite", "quality", "--images", str(tmp_path), "--backbone", "mmada")
    assert named.exit_code == 1 and "skipping" not in named.output and "DeQA" in named.output


def test_validate_reports_the_key_path(tmp_path):
    ok = invoke("validate", str(REPO_ROOT / "evaluators" / "suites" / "shapes-geneval.yaml"))
    assert ok.exit_code == 0 and "ok: suite shapes-geneval v1" in ok.output and "single_object 24" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.replace("max_prompts_per_tag: 1", "max_prompts_per_tag: -3"))
    result = invoke("validate", str(bad))
    assert result.exit_code == 1 and "prompts.shapes.max_prompts_per_tag" in result.output
    assert "Traceback" not in result.output
    override = invoke("validate", str(tmp_path / "bad.yaml"), "prompts.max_prompts_per_tag=2")
    assert override.exit_code == 0, override.output


def test_data_fetch_copies_checks_and_explains_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_OFFLINE", "1")
    offline = invoke("data", "fetch", "geneval", "--dest", str(tmp_path / "d"))
    assert offline.exit_code == 1 and "--prompts" in offline.output and "Traceback" not in offline.output
    altered = tmp_path / "evaluation_metadata.jsonl"
    altered.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}\n')
    result = invoke("data", "fetch", "geneval", "--prompts", str(altered), "--dest", str(tmp_path / "d"))
    assert result.exit_code == 1 and "sha256" in result.output
    assert not (tmp_path / "d" / "geneval" / "evaluation_metadata.jsonl").exists()
    if not SHARED_GENEVAL.is_dir():
        pytest.skip("../shared/reference/geneval is not present")
    result = invoke("data", "fetch", "geneval", "--prompts", str(SHARED_GENEVAL), "--dest", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    copied = tmp_path / "d" / "geneval" / "evaluation_metadata.jsonl"
    assert copied.read_bytes() == (SHARED_GENEVAL / "evaluation_metadata.jsonl").read_bytes()
    result = invoke("data", "fetch", "dpg", "--prompts", str(SHARED_DPG), "--dest", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "d" / "dpg" / "prompts").glob("*.txt"))) == 1065


def test_thin_commands_pass_their_arguments(tmp_path, monkeypatch):
    calls = {}

    def fake(module: str, attr: str, code: int):
        def record(**kwargs):
            calls[attr] = kwargs
            return code
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{attr: record}))

    fake("trainers.loop", "cli_train", 0)
    fake("leaderboards.publish", "cli_leaderboard", 0)
    fake("leaderboards.check", "cli_check", 1)
    result = invoke("train", "--config", "c.yaml", "--steps", "5", "trainer.lr=0.1", "seed=3")
    assert result.exit_code == 0, result.output
    assert calls["cli_train"] == {"config": Path("c.yaml"), "run_dir": None, "steps": 5, "resume": None,
                                  "overrides": ["trainer.lr=0.1", "seed=3"]}
    assert invoke("leaderboard", "--format", "html", "--out", "r.html").exit_code == 0
    assert calls["cli_leaderboard"] == {"store": None, "out": Path("r.html"), "fmt": "html"}
    result = invoke("check", "--checkpoint", "ck", "--baseline", "b.json", "--tolerance", "0.02")
    assert result.exit_code == 1      # the check's own exit code
    assert calls["cli_check"] == {"checkpoint": Path("ck"), "baseline": Path("b.json"), "tolerance": 0.02,
                                  "update": False}


def test_cli_import_is_light():
    code = ("import sys, harness.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'evaluators', 'trainers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
