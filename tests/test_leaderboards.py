"""Leaderboards: golden markdown from a hand-built store, the regression comparison, baseline round trip,
and the HTML report (no browser)."""
from __future__ import annotations

import base64
import json
import sys
import types

import numpy as np
import pytest

from harness.io import append_jsonl
from harness.store import ResultsStore
from leaderboards import check
from leaderboards.check import (baseline_from_frame, cli_check, compare, load_baseline, tolerances_from_spread,
                                write_baseline)
from leaderboards.leaderboard import build_tables, protocol_id, render_markdown, training_seed
from leaderboards.publish import cli_leaderboard
from leaderboards.report import build_report

PROTOCOL = {"sampler": {"steps": 12, "cfg": 2.0}, "resolution": 64, "images_per_prompt": 4}
OTHER_PROTOCOL = {**PROTOCOL, "sampler": {"steps": 24, "cfg": 2.0}}


def metric(name: str, value: float, higher_is_better: bool = True) -> dict:
    return {"name": name, "value": value, "scale": "0-1", "higher_is_better": higher_is_better, "version": "1"}


def add_eval(store, suite, metrics, *, method="ht-grpo", seed=1, step=100, eval_seed=0, protocol=PROTOCOL,
             provenance=None, finish=True, run=True):
    run_dir = f"runs/{method}-seed{seed}" if run else None
    checkpoint = f"{run_dir}/step_{step}" if run else "/ckpts/tiny_base.safetensors"
    eid = store.begin_evaluation(suite, "1", checkpoint, eval_seed, protocol,
                                 checkpoint_hash=f"{method}-{seed}-{step}" if run else "base", backbone="tiny",
                                 method=method if run else None, run=run_dir, step=step if run else None,
                                 provenance=provenance or ({"train_seed": seed} if run else {}))   # as evaluate() records it
    store.set_metrics(eid, suite, metrics)
    if finish:
        store.finish_evaluation(eid)
    return eid


@pytest.fixture
def store(tmp_path):
    with ResultsStore(tmp_path / "store.sqlite") as s:
        add_eval(s, "shapes-geneval", [metric("geneval_overall", 0.40), metric("geneval_counting", 0.30)], run=False)
        # grpo: two training seeds
        add_eval(s, "shapes-geneval", [metric("geneval_overall", 0.50), metric("geneval_counting", 0.25)],
                 method="grpo", seed=1)
        add_eval(s, "shapes-geneval", [metric("geneval_overall", 0.60), metric("geneval_counting", 0.35)],
                 method="grpo", seed=2)
        # ht-grpo: seed 1 evaluated with two eval seeds (one model: averaged first), seed 2 once
        add_eval(s, "shapes-geneval", [metric("geneval_overall", 0.80), metric("geneval_counting", 0.70)])
        add_eval(s, "shapes-geneval", [metric("geneval_overall", 0.82), metric("geneval_counting", 0.70)], eval_seed=1)
        add_eval(s, "shapes-geneval", [metric("geneval_overall", 0.866), metric("geneval_counting", 0.75)], seed=2)
        # the same checkpoint under a different protocol: its own row, never merged
        add_eval(s, "shapes-geneval", [metric("geneval_overall", 0.99)], protocol=OTHER_PROTOCOL)
        # still running: not on the leaderboard (grpo's Seeds stay "1, 2")
        add_eval(s, "shapes-geneval", [metric("geneval_overall", 0.01)], method="grpo", seed=3, finish=False)
        add_eval(s, "shapes-quality", [metric("stray_cell_fraction", 0.012, False), metric("shape_fidelity", 0.9)])
        # the real benchmark: shares its table with the paper's reported rows
        add_eval(s, "geneval", [metric("geneval_overall", 0.7049), metric("geneval_position", 0.5)])
        add_eval(s, "quality", [metric("imagereward", 0.861), metric("unipercept_quality", 66.2)])
        add_eval(s, "preference", [metric("pickscore", 21.5), metric("hpsv21", 28.25)])
        yield s


def cells(markdown: str, heading: str) -> list[list[str]]:
    """The rows (header first, separator dropped) of the table under '## heading', split into cells."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for i, line in enumerate(lines) if i != 1]


def test_golden_leaderboard_markdown(store):
    md = render_markdown(build_tables(store.latest_metrics()))
    p1 = f"shapes-geneval@1, 12 steps, cfg 2, 64px, 4 img/prompt #{protocol_id('shapes-geneval', '1', PROTOCOL)}"
    p2 = f"shapes-geneval@1, 24 steps, cfg 2, 64px, 4 img/prompt #{protocol_id('shapes-geneval', '1', OTHER_PROTOCOL)}"
    blank = ["–"] * 4
    assert cells(md, "Shapes GenEval") == [
        ["Source", "Backbone", "Method", "Checkpoint", "n", "Seeds", "Single Obj.", "Two Obj.", "Counting", "Colors",
         "Position", "Color Attri.", "Overall", "Protocol"],
        ["measured", "tiny", "base", "tiny_base.safetensors", "1", "–", "–", "–", "0.30", "–", "–", "–", "0.40", p1],
        ["measured", "tiny", "grpo", "step 100", "2", "1, 2", "–", "–", "0.30 ± 0.07", *blank[:3], "0.55 ± 0.07", p1],
        # seed 1 = mean of its eval seeds (0.81), then over training seeds: 0.838 ± 0.0396
        ["measured", "tiny", "ht-grpo", "step 100", "2", "1, 2", "–", "–", "0.72 ± 0.04", *blank[:3], "0.84 ± 0.04", p1],
        # a different protocol: its own row, after the 12-step one, never merged
        ["measured", "tiny", "ht-grpo", "step 100", "1", "1", "–", "–", "–", "–", "–", "–", "0.99", p2],
    ]
    quality = cells(md, "Shapes quality (reward-hacking watch)")
    assert quality[0][6:8] == ["stray_cell_fraction ↓", "shape_fidelity ↑"]
    assert quality[1][6:8] == ["0.012", "0.900"]
    # measured rows first, then the paper's rows in the paper's order, marked as reported
    geneval = cells(md, "GenEval")
    assert geneval[1] == ["measured", "tiny", "ht-grpo", "step 100", "1", "1", "–", "–", "–", "–", "0.50", "–", "0.70",
                          f"geneval@1, 12 steps, cfg 2, 64px, 4 img/prompt #{protocol_id('geneval', '1', PROTOCOL)}"]
    assert all(row[0] == "reported (Tab. 1)" for row in geneval[2:]) and len(geneval) == 15
    assert geneval[2][1:3] == ["SDXL", "–"] and geneval[2][-2] == "0.55"
    assert geneval[-1][1:3] == ["lumina-dimoo", "ht-grpo"] and geneval[-1][-2:] == ["0.92", "paper's own (not recorded)"]
    assert cells(md, "DPG-Bench")[5][1:3] == ["mmada", "base"] and cells(md, "DPG-Bench")[5][-2] == "70.51"
    dpg_section = md[md.index("## DPG-Bench\n"):md.index("## Protocols")]   # a reader comparing categories is warned
    assert "PYTHONHASHSEED=0" in dpg_section and "docs/benchmarks.md" in dpg_section
    # the scorers' metric names land in the paper's Table-3 columns, beside its reported rows
    quality_table = cells(md, "Quality / preference")
    header = quality_table[0]
    assert header[6:12] == ["DeQA ↑", "ImgReward ↑", "HPSv3 ↑", "UniPercept Aes. ↑", "UniPercept Qual. ↑",
                            "UniPercept Struct. ↑"]
    assert quality_table[1][0] == "measured" and quality_table[1][7] == "0.86" and quality_table[1][10] == "66.20"
    assert quality_table[2][0] == "reported (Tab. 3)"
    assert cells(md, "Preference extras")[0][6:8] == ["HPSv2.1 ↑", "PickScore ↑"]
    # tables with measured rows first, reference-only tables (DPG-Bench) after them
    order = [md.index(f"## {h}\n") for h in ("GenEval", "Quality / preference", "Preference extras", "Shapes GenEval",
                                             "Shapes quality (reward-hacking watch)", "DPG-Bench", "Protocols")]
    assert order == sorted(order)
    assert "reported (Tab. 3)" in md and "## Protocols" in md and '"steps": 24' in md


def test_training_seed_sources(tmp_path):
    assert training_seed("runs/a", {"train_seed": 7}) == 7
    assert training_seed("runs/seedless", {}) is None
    run = tmp_path / "htgrpo_seed3"             # the name says 3, the run's config says 11: the config wins
    run.mkdir()
    (run / "config.yaml").write_text("seed: 11\n")
    assert training_seed(str(run), {}) == 11
    assert training_seed(str(tmp_path / "exp-seed_12"), None) is None   # a name alone is not a seed


def test_cli_leaderboard_writes_file(store, tmp_path, capsys):
    path = cli_leaderboard(store, tmp_path / "out" / "lb.md")
    assert capsys.readouterr().out.strip() == path
    assert "## Shapes GenEval" in (tmp_path / "out" / "lb.md").read_text()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli_leaderboard(tmp_path / "missing.sqlite")


BASELINE = {"backbone": "tiny", "checkpoint_hash": "h", "provenance": {}, "suites": {"shapes-quality": {
    "version": "1", "metrics": {
        "shape_fidelity": {"value": 0.90, "tolerance": 0.02, "higher_is_better": True},
        "stray_cell_fraction": {"value": 0.10, "tolerance": 0.02, "higher_is_better": False}}}}}


def test_compare_drop_tolerance_and_direction():
    rows, failed = compare(BASELINE, {"shapes-quality": {"shape_fidelity": 0.885, "stray_cell_fraction": 0.05}})
    assert not failed and {r.metric: r.status for r in rows} == {"shape_fidelity": "ok", "stray_cell_fraction": "better"}
    rows, failed = compare(BASELINE, {"shapes-quality": {"shape_fidelity": 0.87, "stray_cell_fraction": 0.10}})
    assert failed and [r.status for r in rows] == ["DROP", "ok"]
    # lower is better: a rise beyond the tolerance is a drop, a fall is not
    rows, failed = compare(BASELINE, {"shapes-quality": {"shape_fidelity": 0.95, "stray_cell_fraction": 0.13}})
    assert failed and [r.status for r in rows] == ["better", "DROP"]
    assert not compare(BASELINE, {"shapes-quality": {"shape_fidelity": 0.87, "stray_cell_fraction": 0.1}},
                       tolerance=0.05)[1]
    rows, failed = compare(BASELINE, {"shapes-quality": {"shape_fidelity": 0.9, "extra": 1.0}})
    assert failed and {r.metric: r.status for r in rows} == {"shape_fidelity": "ok", "stray_cell_fraction": "missing",
                                                            "extra": "new"}
    assert compare(BASELINE, {"shapes-quality": {"shape_fidelity": 0.9, "stray_cell_fraction": 0.1}},
                   versions={"shapes-quality": "2"})[1]


def test_tolerances_from_spread():
    tol = tolerances_from_spread({"a": [0.5, 0.6], "b": {0: 0.5, 1: 0.5}, "c": [3.0]}, k=3.0, floor=0.02)
    assert tol["a"] == pytest.approx(3 * 0.0707107, rel=1e-4) and tol["b"] == 0.02 and tol["c"] == 0.02
    assert tolerances_from_spread({"dpg_overall": [80.0]}, floor={"dpg_overall": 1.0}) == {"dpg_overall": 1.0}


def test_baseline_update_round_trip(tmp_path, monkeypatch, capsys):
    with ResultsStore(tmp_path / "store.sqlite") as store:
        for eval_seed, fid in enumerate((0.90, 0.92, 0.94)):
            add_eval(store, "shapes-quality", [metric("shape_fidelity", fid),
                                                metric("stray_cell_fraction", 0.1, False)], eval_seed=eval_seed)
        baseline = baseline_from_frame(store.latest_metrics(), "ht-grpo-1-100", k=3.0)
    fid = baseline["suites"]["shapes-quality"]["metrics"]["shape_fidelity"]
    assert fid["value"] == pytest.approx(0.92) and fid["tolerance"] == pytest.approx(0.06)
    path = write_baseline(tmp_path / "baseline.json", baseline)
    assert load_baseline(path) == json.loads(json.dumps(baseline))

    # fake evaluation: the check only needs evaluators.run.evaluate_checkpoints
    measured = {"shape_fidelity": 0.80, "stray_cell_fraction": 0.1}
    suite_version = {"shapes-quality": "1"}

    from evaluators.run import CheckpointScores

    def fake_evaluate_checkpoints(source, suites, store, **_):   # this test is about the baseline file, not a model
        out = []
        for suite in suites:
            eid = store.begin_evaluation(suite, suite_version[suite], str(source), 0, PROTOCOL,
                                         checkpoint_hash="new", backbone="tiny", provenance={})
            store.set_metrics(eid, suite, [metric("shape_fidelity", measured["shape_fidelity"]),
                                           metric("stray_cell_fraction", measured["stray_cell_fraction"], False)])
            store.finish_evaluation(eid)
            out.append(CheckpointScores(str(source), None, suite, suite_version[suite], dict(measured)))
        return out

    fake_run = types.ModuleType("evaluators.run")
    fake_run.evaluate_checkpoints = fake_evaluate_checkpoints
    fake_run.weights_hash = lambda path: "new"
    monkeypatch.setitem(sys.modules, "evaluators.run", fake_run)
    kwargs = dict(store=tmp_path / "check.sqlite", out_root=tmp_path / "out", progress=False)
    assert cli_check("ckpt", path, **kwargs) == 1
    assert "DROP" in capsys.readouterr().out
    assert cli_check("ckpt", path, update=True, **kwargs) == 0
    updated = load_baseline(path)["suites"]["shapes-quality"]["metrics"]["shape_fidelity"]
    assert updated == {**fid, "value": 0.80}   # value replaced, spread-based tolerance kept
    assert load_baseline(path)["checkpoint_hash"] == "new"
    assert cli_check("ckpt", path, **kwargs) == 0
    suite_version["shapes-quality"] = "2"   # a new suite version is never compared with the old numbers
    assert cli_check("ckpt", path, **kwargs) == 1
    assert "re-baseline" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="baseline"):
        check.load_baseline(tmp_path / "nope.json")


def test_html_report(store, tmp_path):
    import matplotlib.image as mpimg

    run_dir = tmp_path / "runs" / "ht-grpo-seed1"
    for step in range(1, 6):
        append_jsonl(run_dir / "metrics.jsonl", {"step": step, "reward_mean": 0.1 * step, "reward_std": 0.05,
                                                 "kl": 0.01 * step, **({"eval/shapes-geneval/geneval_overall": 0.8}
                                                                       if step == 5 else {})})
    images = tmp_path / "images"
    for step, colour in ((100, 0.2), (200, 0.8)):
        sample_dir = images / f"s{step}" / "00000" / "samples"   # the GenEval layout
        sample_dir.mkdir(parents=True)
        mpimg.imsave(sample_dir / "0000.png", np.full((8, 8, 3), colour))
        eid = add_eval(store, "shapes-geneval", [metric("geneval_overall", 0.5)], step=step, eval_seed=7,
                       provenance={"out_dir": str(images / f"s{step}")}, finish=False)
        store.add_records(eid, "shapes-geneval", {"00000/0000": {"prompt": "a photo of a red square"}})
        store.finish_evaluation(eid)
    assert store.path.parent == tmp_path   # run "runs/..." is relative: the report also looks beside the store
    text = build_report(store)
    pngs = [chunk.split('"')[0] for chunk in text.split("data:image/png;base64,")[1:]]
    assert len(pngs) >= 2 and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "<th>Single Obj.</th>" in text and "reported (Tab. 1)" in text
    geneval = text.split('id="table-geneval"', 1)[1].split("</table>")[0]   # measured then reported rows
    assert geneval.index('<tr class="measured">') < geneval.index('<tr class="reported">')
    assert "no metrics.jsonl found for run runs/grpo-seed1" in text
    grid = text.split("eval seed 7", 1)[1].split("<h3>")[0]   # the grid of steps 100 and 200 has an image
    assert "data:image/png;base64," in grid and "no images found" not in grid


def test_paired_gain_on_a_hand_built_case(tmp_path):
    """Two tags; base and checkpoint judged on the same four images of each. Tag a: differences (1, 1, 0, 0) ->
    mean 0.5, var 1/3; tag b: (0, 0, 0, -1) -> mean -0.25, var 1/4. gain = (0.5 - 0.25) / 2 = 0.125,
    s.e. = sqrt(1/3 / 4 + 1/4 / 4) / 2."""
    from leaderboards.gain import gains_over_base, paired_gain
    base = {"a": [0, 0, 1, 0], "b": [1, 1, 0, 1]}
    ckpt = {"a": [1, 1, 1, 0], "b": [1, 1, 0, 0]}
    with ResultsStore(tmp_path / "s.sqlite") as store:
        ids = []
        for judged, run in ((base, False), (ckpt, True)):
            records = {f"{tag}/{i}.png": {"tag": tag, "correct": bool(c)} for tag, cs in judged.items()
                       for i, c in enumerate(cs)}
            overall = sum(sum(cs) / len(cs) for cs in judged.values()) / 2
            eid = add_eval(store, "shapes-geneval", [metric("geneval_overall", overall)], run=run, finish=False)
            store.add_records(eid, "shapes-geneval", records)
            store.finish_evaluation(eid)
            ids.append(eid)
        gain, stderr, n = paired_gain(store, ids[0], ids[1], "shapes-geneval")
        assert n == 8 and gain == pytest.approx(0.125)
        assert stderr == pytest.approx(((1 / 3) / 4 + (1 / 4) / 4) ** 0.5 / 2)
        [g] = gains_over_base(store)
        assert g.gain == pytest.approx(g.value - g.base) and not g.significant


def test_the_table_comes_from_the_suite_declaration_not_its_name():
    from leaderboards.leaderboard import table_key
    assert table_key("my-variant", {"leaderboard": "geneval"}) == "geneval"     # as evaluate() records it
    assert table_key("geneval-but-not-declared", {}) == "geneval-but-not-declared"   # no prefix guessing
    assert table_key("preference", {}) == "preference" and table_key("shapes-dpg", None) == "shapes-dpg"   # registered
