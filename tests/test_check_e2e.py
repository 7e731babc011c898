"""`harness check` end to end on a small suite: a degraded checkpoint fails, the baseline's own passes."""
import json

import pytest

from harness.backbones.tiny import TinyBackbone, TinyConfig
from leaderboards.check import cli_check

SUITE = """
name: check-mini
version: 1
description: six tags, one eval prompt each, a few images; only for this test
backbones: [tiny]
prompts: {kind: shapes, tags: [single_object, two_object, counting, colors, position, color_attr], split: eval,
          max_prompts_per_tag: 1}
images_per_prompt: 4
min_images_per_tag: 4
seed: 0
sampler: {steps: 8, cfg: 2.0, temperature: 1.0, choice_temperature: 2.0}
resolution: 256
evaluators: [shapes-geneval]
layout: geneval
"""


@pytest.fixture()
def setup(tmp_path):
    suite = tmp_path / "check-mini.yaml"
    suite.write_text(SUITE)
    baseline = tmp_path / "baseline.json"
    # seed the baseline with a placeholder, then let --update measure the shipped base checkpoint into it
    baseline.write_text(json.dumps({"backbone": "tiny", "suites": {str(suite): {"version": "1", "metrics": {
        "geneval_overall": {"value": 0.0, "tolerance": 0.1, "higher_is_better": True}}}}}))
    kw = dict(store=tmp_path / "store.sqlite", out_root=tmp_path / "img", batch_size=32, progress=False)
    return suite, baseline, kw


def test_check_passes_on_its_own_checkpoint_and_fails_on_a_degraded_one(setup, tmp_path):
    from harness.backbones.tiny import DEFAULT_CHECKPOINT
    suite, baseline, kw = setup
    assert cli_check(DEFAULT_CHECKPOINT, baseline, update=True, **kw) == 0
    measured = json.loads(baseline.read_text())["suites"][str(suite)]["metrics"]["geneval_overall"]["value"]
    assert measured >= 0.3, "the shipped base should draw most of these prompts"
    assert cli_check(DEFAULT_CHECKPOINT, baseline, **kw) == 0
    # an untrained model of the same architecture draws noise: every GenEval metric collapses
    random_ckpt = tmp_path / "random.safetensors"
    TinyBackbone(TinyConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden=64)).save(random_ckpt)
    assert cli_check(random_ckpt, baseline, **kw) == 1
