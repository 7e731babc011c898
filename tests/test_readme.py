"""Every command of the README's bash blocks runs as written, in order, from a folder laid out like the repository
root (configs/, harness/assets/, leaderboards/baselines/ and ../shared linked in). Commands on a real backbone
(--backbone mmada) need weights this machine does not have: they must stop at once with one line naming what is
missing, exit code 1, no traceback. `make ...` lines are CI itself and are not run here."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from harness.cli import app

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
WEIGHT_VARIABLES = ("HARNESS_MPLUG_DIR", "HARNESS_DEQA_DIR", "HARNESS_IMAGEREWARD_DIR", "HARNESS_HPSV3_DIR",
                    "HARNESS_UNIPERCEPT_DIR", "HARNESS_HPS_CHECKPOINT", "HARNESS_CLIP_DIR", "HARNESS_GENEVAL_MODELS",
                    "HARNESS_PICKSCORE_DIR", "HARNESS_CLIP_B32_DIR", "HARNESS_AESTHETIC_HEAD", "HARNESS_STORE",
                    "HARNESS_DATA", "HARNESS_DPG_ANSWERS")


def readme_commands(text: str) -> list[str]:
    """The command lines of the README's ```bash blocks, comments removed, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith(("#", "make ")):
                commands.append(line)
    return commands


def test_the_readme_lists_commands():
    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) >= 10 and all(c.startswith(("harness ", "cp ")) for c in commands), commands


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    work = tmp_path / "repo"
    (work / "harness").mkdir(parents=True)
    (work / "configs").symlink_to(REPO / "configs")
    (work / "harness" / "assets").symlink_to(REPO / "harness" / "assets")
    (work / "leaderboards").symlink_to(REPO / "leaderboards")
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(work)
    for var in WEIGHT_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = CliRunner()
    try:
        for line in readme_commands((REPO / "README.md").read_text()):
            argv = shlex.split(line)
            if "../shared/" in line and not SHARED.is_dir():
                continue                         # the reference data is not on this machine
            if argv[0] == "cp":
                shutil.copy(argv[1], argv[2])
                continue
            result = runner.invoke(app, argv[1:])
            output = result.output
            assert "Traceback" not in output, (line, output)
            if "--backbone" in argv and argv[argv.index("--backbone") + 1] != "tiny":
                assert result.exit_code == 1, (line, output)
                errors = [x for x in output.splitlines() if x.startswith("error:")]
                assert len(errors) == 1 and re.search(r"HARNESS_\w+_DIR|weights|download", errors[0]), (line, output)
            else:
                assert result.exit_code == 0, (line, output)
    finally:
        torch.set_num_threads(threads)
    from harness.runs import RunDir
    assert (work / "x.png").is_file() and (work / "leaderboard.md").is_file()
    assert [c.step for c in RunDir(work / "runs" / "x").checkpoints()] == [2, 3]
