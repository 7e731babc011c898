"""The shape of the code (docs/architecture.md), checked: imports run one way between the rooms, no module imports
itself back through others, and only harness/runs.py names the files of a run folder."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("harness", "evaluators", "trainers", "leaderboards")
# room -> the rooms it may import (harness/cli.py, the command line, sits on top and may import all of them)
MAY_IMPORT = {"harness": {"harness"}, "evaluators": {"harness", "evaluators"},
              "trainers": {"harness", "evaluators", "trainers"}, "leaderboards": {"harness", "evaluators", "leaderboards"}}
RUN_FOLDER_FILES = {"trainer_state.pt", "metrics.jsonl", "metrics.json", "adapter.safetensors", "checkpoints", "tb"}


def modules() -> dict[str, Path]:
    out = {}
    for room in ROOMS:
        for f in (REPO / room).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(f: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-level (lazy) ones included."""
    out = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_imports_run_one_way_between_the_rooms():
    wrong = []
    for name, f in modules().items():
        room = name.split(".")[0]
        if name == "harness.cli":
            continue
        for line, target in imported(f):
            top = target.split(".")[0]
            if top in ROOMS and top not in MAY_IMPORT[room]:
                wrong.append(f"{f.relative_to(REPO)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    mods = modules()
    graph = {m: {t for _, t in imported(f) if t in mods and t != m} for m, f in mods.items()}
    state: dict[str, int] = {}          # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state:
                found = visit(t, path + [m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            circle = visit(m, [])
            assert circle is None, " -> ".join(circle)


def test_only_harness_runs_names_the_files_of_a_run_folder():
    named = []
    for name, f in modules().items():
        if name == "harness.runs":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and node.value in RUN_FOLDER_FILES:
                named.append(f"{f.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not named, "ask harness.runs.RunDir / Checkpoint instead:\n" + "\n".join(named)
