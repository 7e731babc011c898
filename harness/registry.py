"""One registry for everything named: backbones, methods, evaluators, suites, rewards.

Entries are lazy "module:object" strings, imported on first use, so `harness --help` and the
tiny default never import heavy optional dependencies. Unknown names get a "did you mean".
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any

KINDS = ("backbones", "methods", "evaluators", "suites")

_ENTRIES: dict[str, dict[str, str]] = {
    "backbones": {
        "tiny": "harness.backbones.tiny:load_tiny",
        "mmada": "harness.backbones.mmada:load_mmada",
        "lumina-dimoo": "harness.backbones.lumina_dimoo:load_lumina_dimoo",
    },
    "methods": {
        "grpo": "trainers.methods:GRPO",
        "maskgrpo": "trainers.methods:MASKGRPO",
        "tracegrpo": "trainers.methods:TRACEGRPO",
        "diffu-grpo": "trainers.methods:DIFFU_GRPO",
        "ht-grpo": "trainers.methods:HT_GRPO",
    },
    "evaluators": {
        "shapes-geneval": "evaluators.shapes_suites:SHAPES_GENEVAL",
        "shapes-geneval-partial": "evaluators.shapes_suites:SHAPES_GENEVAL_PARTIAL",
        "shapes-fidelity": "evaluators.shapes_suites:SHAPES_FIDELITY",
        "shapes-dpg": "evaluators.shapes_suites:SHAPES_DPG",
        "shapes-quality": "evaluators.shapes_suites:SHAPES_QUALITY",
        "geneval": "evaluators.geneval_official:GENEVAL",
        "dpg": "evaluators.dpg_judge:DPG",
        "pickscore": "evaluators.preference:PICKSCORE",
        "clipscore": "evaluators.preference:CLIPSCORE",
        "clipscore-eot": "evaluators.preference:CLIPSCORE_EOT",
        "clipscore-hessel": "evaluators.preference:CLIPSCORE_HESSEL",
        "laion-aesthetic": "evaluators.preference:LAION_AESTHETIC",
        "imagereward": "evaluators.imagereward:IMAGEREWARD",
        "hpsv21": "evaluators.hps:HPSV21",
        "hpsv3": "evaluators.hpsv3:HPSV3",
        "deqa": "evaluators.deqa:DEQA",
        "unipercept-aesthetics": "evaluators.unipercept:UNIPERCEPT_AESTHETICS",
        "unipercept-quality": "evaluators.unipercept:UNIPERCEPT_QUALITY",
        "unipercept-structure": "evaluators.unipercept:UNIPERCEPT_STRUCTURE",
        "dpg-official": "evaluators.official:DPG_OFFICIAL",
        "imagereward-official": "evaluators.official:IMAGEREWARD_OFFICIAL",
        "hpsv2-official": "evaluators.official:HPSV2_OFFICIAL",
    },
    "suites": {},  # filled from evaluators/suites/*.yaml on first lookup (see evaluators/suites.py)
}
_LOADED: dict[tuple[str, str], Any] = {}


def register(kind: str, name: str, target: str) -> None:
    """Add an entry "module:object" (used by plugins and tests)."""
    _check_kind(kind)
    _ENTRIES[kind][name] = target
    _LOADED.pop((kind, name), None)


def names(kind: str) -> list[str]:
    _check_kind(kind)
    if kind == "suites":
        _discover_suites()
    return sorted(_ENTRIES[kind])


def target(kind: str, name: str) -> str:
    _check_kind(kind)
    if kind == "suites":
        _discover_suites()
    if name not in _ENTRIES[kind]:
        close = difflib.get_close_matches(name, _ENTRIES[kind], n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown {kind[:-1]} {name!r}.{hint} Known: {', '.join(sorted(_ENTRIES[kind]))}")
    return _ENTRIES[kind][name]


def get(kind: str, name: str) -> Any:
    """Resolve a name to its object, importing its module on first use."""
    spec = target(kind, name)
    if (kind, name) not in _LOADED:
        if kind == "suites":  # suites are YAML files, returned as paths
            _LOADED[(kind, name)] = spec
        else:
            module, _, attr = spec.partition(":")
            _LOADED[(kind, name)] = getattr(importlib.import_module(module), attr)
    return _LOADED[(kind, name)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown registry kind {kind!r}.{hint} Known: {', '.join(KINDS)}")


def _discover_suites() -> None:
    from pathlib import Path
    suite_dir = Path(__file__).resolve().parent.parent / "evaluators" / "suites"
    for path in sorted(suite_dir.glob("*.yaml")):
        _ENTRIES["suites"].setdefault(path.stem, str(path))
