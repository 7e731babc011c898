"""The command examples of docs/*.md run as written, or stop the way the docs say they do on a machine without
what they need (GPU, weights, network). docs/envs.md's commands are run by tests/test_envs.py, the README's by
tests/test_readme.py; a new example in a doc this file does not know fails here until it is tested."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TESTED_ELSEWHERE = {"envs.md": "tests/test_envs.py", "distributed.md": "tests/test_distributed.py"}
NEEDS_NETWORK = ("huggingface-cli download", "modelscope download")


def doc_commands(path: Path) -> list[str]:
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def run_benchmark(argv: list[str]) -> int:
    """A benchmarks/*.py command in this process (its main(argv) returns the exit code)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(Path(argv[0]).stem, REPO / argv[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv[1:])


def test_every_doc_command_is_accounted_for():
    for doc in sorted((REPO / "docs").glob("*.md")):
        for line in doc_commands(doc):
            known = (doc.name in TESTED_ELSEWHERE or line.startswith(NEEDS_NETWORK)
                     or line.startswith("python benchmarks/gpu_check.py")
                     or line.startswith("python benchmarks/real_size.py"))
            assert known, f"{doc.name}: {line!r} is not run by any test"


def test_gpu_check_examples(capsys):
    lines = [shlex.split(c) for c in doc_commands(REPO / "docs" / "backbones.md") if "gpu_check.py" in c]
    assert len(lines) == 3
    for argv in lines:
        argv = argv[1:]                                   # drop "python"
        if "--device" in argv and argv[argv.index("--device") + 1] == "cpu":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert run_benchmark(argv) == 0
            finally:
                torch.set_num_threads(threads)
        elif not torch.cuda.is_available():              # as the docs say: a GPU machine's command
            assert run_benchmark(argv) == 2 and "no CUDA device" in capsys.readouterr().err


def test_the_python_loading_example_names_the_missing_weights():
    text = (REPO / "docs" / "backbones.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    if Path("/data/MMaDA-8B-Base").exists():
        pytest.skip("/data/MMaDA-8B-Base exists here: the example would load real weights")
    with pytest.raises(FileNotFoundError, match="Gen-Verse/MMaDA-8B-Base"):
        exec(compile(block.replace('device="cuda"', 'device="cpu"'), "docs/backbones.md", "exec"), {})

