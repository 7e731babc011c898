"""Hostile and careless input through the real command line (issue 20).

Each case runs `harness ...` (Typer's CliRunner, or a subprocess where processes matter) and checks the exit
code, that the error is one line naming the culprit, that there is no traceback, and that nothing was written
or changed: files under the run / image folders / the store, and the store's rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from harness.cli import app

REPO_ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

TRAIN_YAML = """
name: bad-input
seed: 0
steps: 1
backbone:
  checkpoint: ""
  options: {d_model: 32, n_layers: 1, n_heads: 2, mlp_hidden: 64}
rollout: {prompts_per_step: 2, group_size: 2, sampler: {steps: 4}}
method: {inner_iterations: 1}
reward: {shapes-geneval-partial: 1.0}
checkpoint: {every: 1, eval_suite: null}
tensorboard: false
"""

SUITE_YAML = """
name: bad-input-suite
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


def harness(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, code: int, *names: str) -> str:
    """The one error line of a failed command, checked: exit code, no traceback, names every culprit."""
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and result.exception is None or isinstance(result.exception, SystemExit), out
    lines = [l for l in out.splitlines() if l.lower().startswith("error")]
    assert len(lines) == 1, out
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def tree(*roots: Path) -> dict[str, str]:
    """Every file under the roots with its sha256: equal snapshots = nothing written or changed."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")) if Path(root).exists() else []:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def rows(store: Path) -> list:
    if not store.exists():
        return []
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as c:
        return c.execute("SELECT id, status, protocol_json FROM evaluations ORDER BY id").fetchall()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A trained one-step run, a small suite and its image folder scored into a store: made once, copied by
    the tests that change them."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "train.yaml").write_text(TRAIN_YAML)
    (root / "suite.yaml").write_text(SUITE_YAML)
    result = harness("train", "--config", root / "train.yaml", "--run-dir", root / "run")
    assert result.exit_code == 0, result.output
    ckpt = root / "run" / "checkpoints" / "step_000001"
    result = harness("eval", "--suite", root / "suite.yaml", "--checkpoint", ckpt, "--store", root / "store.sqlite",
                     "--out", root / "images", "--device", "cpu")
    assert result.exit_code == 0, result.output
    (images,) = (root / "images" / "bad-input-suite").iterdir()
    return {"root": root, "run": root / "run", "ckpt": ckpt, "suite": root / "suite.yaml",
            "store": root / "store.sqlite", "images": images, "config": root / "train.yaml"}


def copy_run(work, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(work["run"], run)
    return run


def image_folder(work, tmp_path, name: str = "imgs") -> Path:
    """A copy of the suite's images in GenEval's layout (what `--images` reads)."""
    folder = tmp_path / name
    shutil.copytree(work["images"], folder, ignore=shutil.ignore_patterns("protocol.json", "results.jsonl"))
    return folder


# --- security ----------------------------------------------------------------------------------------------

class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_pickled_payload_in_trainer_state_is_refused_and_does_not_run(work, tmp_path):
    run = copy_run(work, tmp_path)
    state_file = run / "checkpoints" / "step_000001" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "payload_ran"
    state["extra"] = Payload(str(marker))
    torch.save(state, state_file)
    before = tree(run)
    line = error_line(harness("train", "--resume", run, "--steps", "2"), 1, "trainer_state.pt", "could run code")
    assert "GLOBAL" in line
    assert not marker.exists()
    assert tree(run) == before


def test_resume_refuses_weights_that_do_not_belong_to_the_optimizer_state(work, tmp_path):
    run = copy_run(work, tmp_path)
    weights = run / "checkpoints" / "step_000001" / "model.safetensors"
    other = tmp_path / "other"
    assert harness("train", "--config", work["config"], "--run-dir", other, "seed=1").exit_code == 0
    shutil.copy(other / "checkpoints" / "step_000001" / "model.safetensors", weights)
    before = tree(run)
    error_line(harness("train", "--resume", run, "--steps", "2"), 1, "model.safetensors", "sha256")
    assert tree(run) == before


def test_prompt_ids_that_would_leave_the_output_folder_are_refused(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"tag": "dpg", "prompt": "a red square", "include": [],
                                "item_id": "../../../../escaped"}) + "\n")
    suite = tmp_path / "evil.yaml"
    suite.write_text(f"name: evil\nversion: 1\nbackbones: [tiny]\nprompts: {{kind: geneval-metadata, path: {meta}}}\n"
                     "images_per_prompt: 4\nsampler: {steps: 2}\nevaluators: [shapes-dpg]\nlayout: dpg\n")
    error_line(harness("validate", suite), 1, "item_id", "escaped")
    out = tmp_path / "deep" / "a" / "b" / "c"
    error_line(harness("eval", "--suite", suite, "--checkpoint", "", "--out", out, "--store", tmp_path / "s.sqlite",
                       "--device", "cpu"), 1, "item_id")
    assert not list(tmp_path.rglob("escaped*"))
    assert not (tmp_path / "s.sqlite").exists()


def test_leaderboard_markdown_escapes_names_from_folders(work, tmp_path):
    store = tmp_path / "store.sqlite"
    shutil.copy(work["store"], store)
    folder = image_folder(work, tmp_path, "<img src=x onerror=alert(1)> [x](javascript:y) *b*")
    assert harness("eval", "--suite", work["suite"], "--images", folder, "--store", store).exit_code == 0
    out = tmp_path / "board.md"
    result = harness("leaderboard", "--store", store, "--out", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<img" not in text and "[x](javascript" not in text and " *b*" not in text


# --- incomplete benchmarks ------------------------------------------------------------------------------------

def test_incomplete_images_folder_is_refused_and_allow_partial_labels_it(work, tmp_path):
    store = tmp_path / "store.sqlite"
    shutil.copy(work["store"], store)
    folder = image_folder(work, tmp_path)
    shutil.rmtree(folder / "00001")
    (folder / "00000" / "samples" / "0001.png").unlink()
    before_rows, before_files = rows(store), tree(folder)
    line = error_line(harness("eval", "--suite", work["suite"], "--images", folder, "--store", store), 1,
                      "incomplete", "00000 (1/2)", "00001 (0/2)", "--allow-partial")
    assert "2 of 2 prompts" in line
    assert rows(store) == before_rows and tree(folder) == before_files
    result = harness("eval", "--suite", work["suite"], "--images", folder, "--store", store, "--allow-partial")
    assert result.exit_code == 0, result.output
    assert "partial" in result.output
    partial = json.loads(rows(store)[-1][2])["partial"]
    assert partial == {"prompts_scored": 1, "prompts_total": 2, "images_scored": 1, "images_expected": 4,
                       "missing_prompts": ["00000", "00001"]}
    board = tmp_path / "board.md"
    assert harness("leaderboard", "--store", store, "--out", board).exit_code == 0
    assert "PARTIAL 1/2 prompts" in board.read_text()


def dpg_suite(tmp_path) -> Path:
    suite = tmp_path / "dpg-suite.yaml"
    suite.write_text("name: bad-dpg\nversion: 1\nbackbones: [tiny]\nprompts: {kind: shapes-dense, count: 2}\n"
                     "images_per_prompt: 4\nsampler: {steps: 2}\nevaluators: [shapes-dpg]\nlayout: dpg\n")
    return suite


def test_dpg_grid_of_the_wrong_size_is_refused(tmp_path):
    from evaluators.suites import load_suite, suite_prompts
    suite = dpg_suite(tmp_path)
    grids = tmp_path / "grids"
    grids.mkdir()
    for p in suite_prompts(load_suite(suite)):
        Image.new("RGB", (128, 128)).save(grids / f"{p.prompt_id}.png")
    store = tmp_path / "s.sqlite"
    error_line(harness("eval", "--suite", suite, "--images", grids, "--store", store, "--resolution", "48"), 1,
               "128x128", "96x96", "--resolution")
    Image.new("RGB", (128, 100)).save(next(grids.iterdir()))
    error_line(harness("eval", "--suite", suite, "--images", grids, "--store", store), 1, "128x100", "--resolution")
    assert rows(store) == []


def test_geneval_folder_edge_cases_name_the_path(work, tmp_path):
    folder = image_folder(work, tmp_path)
    shutil.rmtree(folder / "00001" / "samples")
    error_line(harness("eval", "--suite", work["suite"], "--images", folder, "--store", tmp_path / "s.sqlite"), 1,
               "00001 has no samples/")
    shutil.copytree(folder / "00000" / "samples", folder / "00001" / "samples")
    (folder / "00001" / "samples" / "0000.png").unlink()
    (folder / "00001" / "samples" / "0000.png").mkdir()
    error_line(harness("eval", "--suite", work["suite"], "--images", folder, "--store", tmp_path / "s.sqlite"), 1,
               "0000.png is not an image file")
    (folder / "00001" / "samples" / "0000.png").rmdir()
    (folder / "00000" / "metadata.jsonl").write_text("[1, 2]\n")
    error_line(harness("eval", "--suite", work["suite"], "--images", folder, "--store", tmp_path / "s.sqlite"), 1,
               "00000/metadata.jsonl", "list")
    assert rows(tmp_path / "s.sqlite") == []


def test_truncated_png_names_the_file(work, tmp_path):
    folder = image_folder(work, tmp_path)
    png = folder / "00001" / "samples" / "0001.png"
    png.write_bytes(png.read_bytes()[:60])
    error_line(harness("eval", "--suite", work["suite"], "--images", folder, "--store", tmp_path / "s.sqlite"), 1,
               "00001/samples/0001.png", "not a readable image")


def test_corrupt_protocol_json_names_the_file(work, tmp_path):
    out = tmp_path / "images"
    shutil.copytree(work["images"].parent.parent, out)
    (protocol,) = out.rglob("protocol.json")
    protocol.write_text("{not json")
    before = tree(out)
    error_line(harness("eval", "--suite", work["suite"], "--checkpoint", work["ckpt"], "--out", out, "--store",
                       tmp_path / "s.sqlite", "--device", "cpu"), 1, "protocol.json", "corrupt")
    assert tree(out) == before


def test_zero_byte_cached_image_is_drawn_again_identically(work, tmp_path):
    out = tmp_path / "images"
    shutil.copytree(work["images"].parent.parent, out)
    (sample,) = [p for p in out.rglob("0001.png") if p.parent.parent.name == "00000"]
    original = sample.read_bytes()
    sample.write_bytes(b"")
    result = harness("eval", "--suite", work["suite"], "--checkpoint", work["ckpt"], "--out", out, "--store",
                     tmp_path / "fresh.sqlite", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sample.read_bytes() == original


# --- one validator ------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    ("steps=0", "steps"), ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.prompts_per_step=0", "rollout.prompts_per_step"), ("rollout.batch_size=0", "rollout.batch_size"),
    ("checkpoint.every=0", "checkpoint.every"), ("method.inner_iterations=0", "method.inner_iterations"),
    ("method.structure_fraction=-1", "method.structure_fraction"), ("method.sample_fraction=1.5", "sample_fraction"),
    ("rollout.tag_weights={colors: -1}", "rollout.tag_weights"), ("rollout.tag_weights={}", "rollout.tag_weights"),
    ("rollout.tag_weights={colours: 1}", "colours"), ("optim.lr=.nan", "optim.lr"), ("loss.clip_eps=.inf", "clip_eps"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"), ("method.n_global=3", "n_global"), ("name=../x", "name"),
    ("backbone.options={d_model: 32, n_layers: 1, n_heads: 2, mlp_hidden: 64, bogus: 1}", "bogus"),
    ("backbone.device=tpu", "tpu"), ("reward={}", "reward"), ("rollout.sampler.preset=mmadaa", "mmadaa"),
    # a key the chosen method never reads is an error, not a silent no-op
    ("method.mask_ratio=cosine", "method.mask_ratio does not apply to method 'ht-grpo'"),
    ("method={name: grpo, inner_iterations: 1, partition: entropy_low}", "method.partition does not apply to method 'grpo'"),
]


@pytest.mark.parametrize("setting, culprit", BAD_SETTINGS)
def test_validate_and_train_reject_the_same_settings(work, tmp_path, setting, culprit):
    checked = error_line(harness("validate", work["config"], setting), 1, culprit)
    run = tmp_path / "run"
    trained = error_line(harness("train", "--config", work["config"], "--run-dir", run, setting), 1, culprit)
    assert checked.split(":", 2)[-1] == trained.split(":", 2)[-1] or culprit in trained
    assert not run.exists()


@pytest.mark.parametrize("setting, culprit", [("method.name=ht-grpoo", "Did you mean 'ht-grpo'"),
                                              ("reward={shapes-genevall: 1}", "Did you mean"),
                                              ("backbone.name=tinyy", "Did you mean 'tiny'")])
def test_unknown_names_get_did_you_mean_from_validate_and_train(work, tmp_path, setting, culprit):
    error_line(harness("validate", work["config"], setting), 2, culprit)
    error_line(harness("train", "--config", work["config"], "--run-dir", tmp_path / "run", setting), 2, culprit)
    assert not (tmp_path / "run").exists()


def test_shipped_configs_pass_validate():
    for path in sorted((REPO_ROOT / "configs").rglob("*.yaml")):
        result = harness("validate", path)
        assert result.exit_code == 0 and "ok: training config" in result.output, (path, result.output)


def test_steps_zero_on_the_command_line_is_refused(work, tmp_path):
    result = harness("train", "--config", work["config"], "--run-dir", tmp_path / "run", "--steps", "0")
    assert result.exit_code == 2 and "--steps" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    result = harness("pretrain", "--steps", "0", "--out", tmp_path / "w.safetensors")
    assert result.exit_code == 2 and "--steps" in result.output
    assert not list(tmp_path.iterdir())


def test_binary_config_names_the_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    error_line(harness("validate", config), 1, "config.yaml", "not a text file")
    error_line(harness("train", "--config", config, "--run-dir", tmp_path / "run"), 1, "config.yaml")


def test_a_huge_value_is_not_echoed_whole(work, tmp_path):
    line = error_line(harness("train", "--config", work["config"], "--run-dir", tmp_path / "r", "name=" + "a/" * 52000),
                      1, "name")
    assert len(line) < 500


# --- resume ---------------------------------------------------------------------------------------------------

def test_resume_needs_only_the_run_folder_and_says_what_it_ignores(work, tmp_path):
    run = copy_run(work, tmp_path)
    stale = run / "checkpoints" / ".tmp_step_000002_999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    result = harness("train", "--resume", run, "--steps", "2", "--config", work["config"], "optim.lr=0.5", "seed=3")
    assert result.exit_code == 0, result.output
    assert "resume keeps optim.lr = 0.0001" in result.output and "resume keeps seed = 0" in result.output
    assert "steps: 1 -> 2" in result.output
    assert not stale.exists()
    saved = (run / "config.yaml").read_text()
    assert "lr: 0.0001" in saved and "steps: 2" in saved
    assert (run / "checkpoints" / "step_000002").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_resume_into_read_only_checkpoints_fails_before_a_step(work, tmp_path):
    run = copy_run(work, tmp_path)
    (run / "checkpoints").chmod(0o555)
    try:
        error_line(harness("train", "--resume", run, "--steps", "2"), 1, "cannot write", "checkpoints")
        assert not (run / "metrics.jsonl").read_text().count('"step": 2')
    finally:
        (run / "checkpoints").chmod(0o755)


# --- stores -----------------------------------------------------------------------------------------------------

def test_store_problems_are_one_line_errors_and_nothing_is_changed(work, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    error_line(harness("leaderboard", "--store", folder, "--out", tmp_path / "b.md"), 1, "a_folder")
    text = tmp_path / "notes.sqlite"
    text.write_text("these are my notes\n" * 100)
    before = tree(tmp_path)
    error_line(harness("leaderboard", "--store", text, "--out", tmp_path / "b.md"), 1, "notes.sqlite")
    error_line(harness("eval", "--suite", work["suite"], "--images", image_folder(work, tmp_path), "--store", text),
               1, "notes.sqlite")
    truncated = tmp_path / "truncated.sqlite"
    truncated.write_bytes(work["store"].read_bytes()[:3000])
    error_line(harness("leaderboard", "--store", truncated, "--out", tmp_path / "b.md"), 1, "truncated.sqlite")
    assert text.read_text() == "these are my notes\n" * 100
    assert not (tmp_path / "b.md").exists()
    assert {k: v for k, v in tree(tmp_path).items() if "imgs" not in k and "truncated" not in k} == before


def test_reading_a_foreign_sqlite_file_never_writes_it(tmp_path):
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE recipes (name TEXT)")
        c.execute("INSERT INTO recipes VALUES ('soup')")
    c.close()
    before = tree(tmp_path)
    error_line(harness("leaderboard", "--store", foreign, "--out", tmp_path / "b.md"), 1, "other.db",
               "not a harness results store")
    assert tree(tmp_path) == before


def test_leaderboard_reads_a_store_without_touching_it(work, tmp_path):
    store = tmp_path / "store.sqlite"
    shutil.copy(work["store"], store)
    before = tree(tmp_path)
    assert harness("leaderboard", "--store", store, "--out", tmp_path / "out" / "b.md").exit_code == 0
    # SQLite's WAL readers share an index file (-shm, and an empty -wal) so that a writer may run meanwhile;
    # the store itself is not written
    after = {k: v for k, v in tree(tmp_path).items() if "/out/" not in k and not k.endswith(("-shm", "-wal"))}
    assert after == before


def test_newer_schema_version_is_refused(work, tmp_path):
    store = tmp_path / "store.sqlite"
    shutil.copy(work["store"], store)
    with sqlite3.connect(store) as c:
        c.execute("UPDATE schema_version SET version = version + 1")
    c.close()
    error_line(harness("leaderboard", "--store", store, "--out", tmp_path / "b.md"), 1, "schema version")


# --- devices and numbers --------------------------------------------------------------------------------------

def test_unknown_and_missing_devices(tmp_path):
    error_line(harness("generate", "--prompt", "a red square", "--out", tmp_path / "x.png", "--device", "tpu"), 1,
               "tpu")
    if not torch.cuda.is_available():
        error_line(harness("generate", "--prompt", "a red square", "--out", tmp_path / "x.png", "--device", "cuda"),
                   1, "CUDA is not available")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, culprit", [(("generate", "--prompt", "p", "--out", "{t}/x.png", "--cfg", "nan"), "--cfg"),
                                           (("generate", "--prompt", "p", "--out", "{t}/x.png", "--cfg", "inf"), "--cfg"),
                                           (("generate", "--prompt", "p", "--out", "{t}/x.gif"), ".gif"),
                                           (("pretrain", "--lr", "nan", "--out", "{t}/w.safetensors"), "--lr"),
                                           (("pretrain", "--model", "{{bad", "--out", "{t}/w.safetensors"), "--model"),
                                           (("pretrain", "--model", '{{"d_modl": 3}}', "--out", "{t}/w.safetensors"),
                                            "d_modl"),
                                           (("check", "--checkpoint", "x", "--baseline", "y", "--tolerance", "nan"),
                                            "--tolerance")])
def test_non_finite_and_malformed_numbers_are_refused(tmp_path, args, culprit):
    error_line(harness(*[a.format(t=tmp_path) for a in args]), 2, culprit)
    assert not list(tmp_path.iterdir())


def test_generate_writes_the_format_its_suffix_names(tmp_path):
    for suffix, magic in ((".jpg", b"\xff\xd8"), (".webp", b"RIFF"), (".png", b"\x89PNG")):
        result = harness("generate", "--prompt", "a red square", "--out", tmp_path / f"x{suffix}", "--steps", "2",
                         "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert (tmp_path / f"x{suffix}").read_bytes().startswith(magic)


# --- two evaluations of one checkpoint at once ----------------------------------------------------------------

def test_two_evals_of_the_same_checkpoint_share_the_work(work, tmp_path):
    store, out = tmp_path / "store.sqlite", tmp_path / "images"
    command = [sys.executable, "-m", "harness.cli", "eval", "--suite", str(work["suite"]), "--checkpoint",
               str(work["ckpt"]), "--store", str(store), "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [r[1] for r in rows(store)] == ["complete"]
    printed = [[l for l in o.splitlines() if "overall" in l.lower()] for o in outputs]
    assert printed[0] == printed[1] and printed[0], outputs


def test_a_method_key_left_at_its_default_is_not_an_error():
    """Configs written before methods owned their keys list every key at its default: they still validate."""
    from trainers.config import MethodConfig, TrainConfig
    from trainers.loop import check_train_config
    every_key = MethodConfig().model_dump()
    for name in ("grpo", "maskgrpo", "tracegrpo", "diffu-grpo", "ht-grpo"):
        cfg = TrainConfig(method={**every_key, "name": name}, reward={"shapes-geneval": 1.0})
        check_train_config(cfg, for_training=False)
    with pytest.raises(ValueError, match="method.min_mask_rate does not apply to method 'grpo'"):
        check_train_config(TrainConfig(method={**every_key, "name": "grpo", "min_mask_rate": 0.3}), for_training=False)
