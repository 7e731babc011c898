"""Each CLIP-family scorer's pixels against its own official preprocessing, over image sizes that tell the rules
apart: square, odd, very wide / tall, up- and down-sampled, and sides where (resized side - 224) % 4 == 3, where
torchvision's CenterCrop (int(round(d / 2.0)), half to even) and transformers' center_crop (d // 2) start one
pixel apart.

References: transformers' own CLIPImageProcessor (PIL backend, installed here) live; torchvision and HPS v2's
transform (not installable in this venv) through tests/data/clip_reference.json, made by
benchmarks/clip_references.py with the official code (torchvision 0.28 Resize + CenterCrop, hpsv2's
image_transform(resize_longest_max=True)), plus the documented torchvision rule written out here, plus torchvision
itself where it is importable (the reference venv)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluators import clip_colors, hps, preference

REFERENCE = json.loads((Path(__file__).parent / "data" / "clip_reference.json").read_text())


def probe_positions(size: int = 224) -> list[tuple[int, int, int]]:
    """The reference's probes: default_rng(1234), 48 x (channel, y, x) (benchmarks/clip_references.py)."""
    rng = np.random.default_rng(1234)
    return [(int(rng.integers(3)), int(rng.integers(size)), int(rng.integers(size))) for _ in range(48)]


def test_image(width: int, height: int) -> np.ndarray:
    """The reference's image for a size (benchmarks/clip_references.py test_image)."""
    return np.random.default_rng(width * 100003 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)


test_image.__test__ = False


def assert_fingerprint(pixels: torch.Tensor, reference: dict, what: str) -> None:
    assert list(pixels.shape) == reference["shape"], what
    pixels = pixels.to(torch.float64)
    got = [float(pixels[c, y, x]) for c, y, x in probe_positions(pixels.shape[-1])]
    assert np.allclose(got, reference["probes"], atol=1e-5), f"{what}: pixels differ"
    assert np.allclose([float(pixels[c].sum()) for c in range(3)], reference["sums"], atol=1e-2), f"{what}: sums differ"


def resized_side(width: int, height: int) -> int:
    """The long side after torchvision's Resize(224): int(224 * long / short) (documented rule)."""
    short, long = sorted((width, height))
    return int(224 * long / short)


SIZES = [tuple(r["size"]) for r in REFERENCE["preprocess"]]
SHIFTED = [s for s in SIZES if (resized_side(*s) - 224) % 4 == 3]


def test_the_sweep_has_sizes_where_the_two_crop_rules_part():
    assert len(SHIFTED) >= 4 and any(min(s) < 224 for s in SHIFTED) and any(min(s) > 224 for s in SHIFTED)
    assert any(max(s) / min(s) >= 5 for s in SIZES) and any(s[0] % 2 and s[1] % 2 for s in SIZES)
    for side in (227, 231, 303):
        assert clip_colors.crop_offset(side, 224, clip_colors.TORCHVISION) == clip_colors.crop_offset(side, 224, clip_colors.HF_PROCESSOR) + 1


@pytest.mark.parametrize("row", REFERENCE["preprocess"], ids=lambda r: "x".join(map(str, r["size"])))
def test_torchvision_rule_matches_torchvision_and_hf_rule_matches_the_hf_processor(row):
    picture = Image.fromarray(test_image(*row["size"]))
    assert_fingerprint(clip_colors.preprocess(picture, 224), row["torchvision"], "torchvision Resize + CenterCrop")
    assert_fingerprint(clip_colors.preprocess(picture, 224, clip_colors.HF_PROCESSOR), row["hf_pil"],
                       "CLIPImageProcessor (PIL backend)")


@pytest.mark.parametrize("row", REFERENCE["preprocess"], ids=lambda r: "x".join(map(str, r["size"])))
def test_hps_transform_matches_hpsv2s_resize_max_size(row):
    ours = hps.preprocess(test_image(*row["size"]))
    if row["hps"]["shape"] != [3, 224, 224]:
        # hpsv2's ResizeMaxSize returns an image whose longest side is already 224 untouched and unpadded (the ViT
        # then cannot take it); ours pads it like every other image: compare the unpadded part
        assert max(row["size"]) == 224 and ours.shape == (3, 224, 224)
        w, h = row["size"]
        top, left = (224 - h) // 2, (224 - w) // 2
        assert_fingerprint(ours[:, top:top + h, left:left + w], row["hps"], "hpsv2 ResizeMaxSize, unpadded part")
        return
    assert_fingerprint(ours, row["hps"], "hpsv2 ResizeMaxSize")


def _hf_processor():
    try:
        from transformers import CLIPImageProcessorPil as Processor      # transformers 5: the PIL backend
    except ImportError:
        from transformers import CLIPImageProcessor as Processor         # transformers 4: the only (PIL) one
    return Processor()     # defaults = laion/CLIP-ViT-H-14 and openai/clip-vit-large-patch14 preprocessor configs


@pytest.mark.parametrize("size", SIZES + [(513, 300), (301, 299), (1023, 77), (7, 5000), (2000, 2003)],
                         ids=lambda s: "x".join(map(str, s)))
def test_hf_rule_is_transformers_clip_image_processor_itself(size):
    array = test_image(*size)
    expected = torch.from_numpy(np.asarray(_hf_processor()(images=[Image.fromarray(array)], return_tensors="np")["pixel_values"][0]))
    got = clip_colors.preprocess(Image.fromarray(array), 224, clip_colors.HF_PROCESSOR)
    assert got.shape == expected.shape == (3, 224, 224)
    assert torch.equal(got, expected)


def test_the_torchvision_rule_written_out():
    """torchvision.transforms.functional: _compute_resized_output_size (the long side int(size * long / short)) and
    center_crop (crop_top = int(round((h - size) / 2.0)))."""
    for w, h in SIZES + [(513, 300), (301, 299)]:
        new = clip_colors.resized_size(w, h, 224)
        assert new == ((224, resized_side(w, h)) if w <= h else (resized_side(w, h), 224))
        for side in new:
            assert clip_colors.crop_offset(side, 224) == int(round((side - 224) / 2.0))
            assert clip_colors.crop_offset(side, 224, clip_colors.HF_PROCESSOR) == math.floor((side - 224) / 2)


def test_live_torchvision_where_installed():
    transforms = pytest.importorskip("torchvision.transforms", reason="torchvision is not installed in this venv")
    pipeline = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                                   transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(clip_colors.OPENAI_MEAN, clip_colors.OPENAI_STD)])
    for size in SIZES:
        picture = Image.fromarray(test_image(*size))
        assert torch.equal(clip_colors.preprocess(picture, 224), pipeline(picture))


# --- which scorer uses which rule ---------------------------------------------------------------------------------

# (scorer, the official preprocessing): PickScore README (AutoProcessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K),
# torchmetrics clip_score.py (CLIPProcessor), jmhessel/clipscore clipscore.py (Resize + CenterCrop),
# improved-aesthetic-predictor simple_inference.py (clip.load's _transform), THUDM/ImageReward ImageReward.py
# (_transform), djghosh13/geneval evaluate_images.py (open_clip's val transform)
OFFICIAL_RULES = {"pickscore": clip_colors.HF_PROCESSOR, "clipscore": clip_colors.HF_PROCESSOR,
                  "clipscore-eot": clip_colors.HF_PROCESSOR, "clipscore-hessel": clip_colors.TORCHVISION,
                  "laion-aesthetic": clip_colors.TORCHVISION, "imagereward": clip_colors.TORCHVISION,
                  "geneval-colors": clip_colors.TORCHVISION}


@pytest.fixture()
def spy(monkeypatch):
    calls: list[str] = []
    real = clip_colors.preprocess

    def recording(crop, size, rule=clip_colors.TORCHVISION):
        calls.append(rule)
        return real(crop, size, rule)

    monkeypatch.setattr(clip_colors, "preprocess", recording)
    return calls


def _samples(n: int = 2):
    from evaluators.base import Sample
    return [Sample(key=f"{i:05d}/0000", metadata={"tag": "dense", "prompt": "a red photo"},
                   image=test_image(200, 207)) for i in range(n)]


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "clipscore-eot", "clipscore-hessel", "laion-aesthetic"])
def test_each_preference_scorer_uses_its_official_rule(name, spy, tiny_clip_dir, tmp_path, monkeypatch):
    from harness import registry

    for w in (preference.PICKSCORE_WEIGHTS, preference.CLIP_L14_WEIGHTS, preference.CLIP_B32_WEIGHTS):
        monkeypatch.setenv(w.env, str(tiny_clip_dir))
    dim = clip_colors.load_clip(tiny_clip_dir).model.config.projection_dim
    torch.save(preference.AestheticHead(dim).state_dict(), tmp_path / "head.pth")
    monkeypatch.setenv(preference.AESTHETIC_HEAD_ENV, str(tmp_path / "head.pth"))
    monkeypatch.setattr(preference, "_LOADED", {})
    registry.get("evaluators", name).score(_samples())
    assert spy and set(spy) == {OFFICIAL_RULES[name]}


def test_imagereward_and_geneval_colours_use_the_torchvision_rule(spy, tiny_clip_dir, monkeypatch):
    from evaluators import imagereward

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, prompts, pixels):
            return torch.zeros(len(prompts))

    monkeypatch.setattr(imagereward, "imagereward_model", lambda: Stub())
    imagereward.score_imagereward(_samples())
    assert spy and set(spy) == {OFFICIAL_RULES["imagereward"]}
    spy.clear()
    clf = clip_colors.load_clip(tiny_clip_dir)
    mask = np.ones((207, 200), dtype=bool)
    clip_colors.classify_colors(clf, test_image(200, 207), [{"class": "car", "bbox": [0, 0, 200, 207], "mask": mask}])
    assert spy and set(spy) == {OFFICIAL_RULES["geneval-colors"]}
