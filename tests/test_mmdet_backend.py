"""GenEval's real-model backends on tiny random models: mmdet Mask2Former, the CLIP colour classifier, and the
"geneval" evaluator end to end. The mmdet tests skip where mmcv's compiled ops are missing (`make mmdet`);
the CLIP tests need only transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evaluators import clip_colors
from evaluators.coco_prompts import COCO_CLASSES, COLORS

# --- the CLIP colour classifier (tiny CLIP: tests/conftest.py) -------------------------------------------------

@pytest.fixture()
def clf(tiny_clip_dir):
    return clip_colors.load_clip(tiny_clip_dir)


def test_tiny_tokenizer_uses_the_merges(clf):
    ids = clf.tokenizer(["a photo of a red-colored car"])["input_ids"][0]
    pieces = clf.tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "<|startoftext|>" and pieces[-1] == "<|endoftext|>"
    assert "photo</w>" not in pieces and "pho" in pieces and "red</w>" in pieces and "-</w>" in pieces


def test_missing_clip_folder_names_the_model_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(clip_colors.CLIP_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14") as e:
        clip_colors.load_clip()
    assert "HARNESS_CLIP_DIR" in str(e.value)
    monkeypatch.setenv(clip_colors.CLIP_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip_colors.load_clip()


def test_masked_crop_is_the_object_on_999_grey_cropped_to_the_rounded_box():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    image[image == 0x99] = 0x98                       # so grey can only come from the background
    mask = np.zeros((12, 16), dtype=bool)
    mask[5:9, 3:7] = True
    # PIL rounds half to even: 2.5 -> 2, 4.5 -> 4, 9.5 -> 10, 10.6 -> 11
    crop = np.asarray(clip_colors.masked_crop(image, mask, [2.5, 4.5, 10.6, 9.5, 0.9]))
    assert crop.shape == (6, 9, 3)
    inside = mask[4:10, 2:11]
    assert np.array_equal(crop[inside], image[4:10, 2:11][inside])
    assert (crop[~inside] == 0x99).all() and (~inside).sum() == 6 * 9 - 16
    # a box that rounds to zero width still gives a one-pixel crop
    assert clip_colors.masked_crop(image, mask, [4.2, 5.0, 4.4, 8.0]).size == (1, 3)
    with pytest.raises(ValueError, match="mask shape"):
        clip_colors.masked_crop(image, mask[:5], [0, 0, 4, 4])


def test_preprocess_resizes_the_short_side_and_centre_crops():
    # a 10x4 image: left half red, right half blue; short side 4 -> 8, long side 20, centre crop 8 of 20
    image = np.zeros((4, 10, 3), dtype=np.uint8)
    image[:, :5] = (255, 0, 0)
    image[:, 5:] = (0, 0, 255)
    pixels = clip_colors.preprocess(Image.fromarray(image), 8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    red = (1 - torch.tensor(clip_colors.OPENAI_MEAN)) / torch.tensor(clip_colors.OPENAI_STD)
    red[1:] = -torch.tensor(clip_colors.OPENAI_MEAN[1:]) / torch.tensor(clip_colors.OPENAI_STD[1:])
    assert torch.allclose(pixels[:, :, 0], red.view(3, 1).expand(3, 8), atol=1e-6)   # far left: pure red
    assert pixels[0, 0, 0] > pixels[0, 0, 7] and pixels[2, 0, 7] > pixels[2, 0, 0]     # red left, blue right


def test_classifier_is_the_renormalised_mean_of_normalised_template_embeddings(clf):
    weights = clip_colors.color_classifier(clf, "fire hydrant")
    assert weights.shape == (16, len(COLORS))
    assert torch.allclose(weights.norm(dim=0), torch.ones(len(COLORS)), atol=1e-5)
    with torch.no_grad():  # one text at a time (no padding), by hand
        for k in (0, 6):
            texts = [f"a photo of a {COLORS[k]} fire hydrant", f"a photo of a {COLORS[k]}-colored fire hydrant",
                     f"a photo of a {COLORS[k]} object"]
            single = []
            for text in texts:
                ids = clf.tokenizer([text], return_tensors="pt")
                feats = clip_colors.projected_features(clf.model.get_text_features(**ids))[0]
                single.append(feats / feats.norm())
            mean = torch.stack(single).mean(0)
            assert torch.allclose(weights[:, k], mean / mean.norm(), atol=1e-5)
    assert clip_colors.color_classifier(clf, "fire hydrant") is weights      # cached per class name
    assert not torch.allclose(clip_colors.color_classifier(clf, "car"), weights)


def test_classify_picks_the_colour_whose_text_embedding_matches_the_crop(clf, monkeypatch):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    mask_a = np.zeros((40, 48), dtype=bool)
    mask_a[4:20, 6:30] = True
    mask_b = np.zeros((40, 48), dtype=bool)
    mask_b[22:38, 10:44] = True
    dets = [{"class": "car", "bbox": [6.0, 4.0, 30.0, 20.0], "mask": mask_a},
            {"class": "bus", "bbox": [10.0, 22.0, 44.0, 38.0], "mask": mask_b}]
    crops = [clip_colors.masked_crop(image, d["mask"], d["bbox"]) for d in dets]
    target = {"car": ("purple", clip_colors.image_embeddings(clf, crops[:1])[0]),
              "bus": ("brown", clip_colors.image_embeddings(clf, crops[1:])[0])}
    real_text_embeddings = clip_colors.text_embeddings

    def rigged(clf_, texts):
        # The tiny model's own embeddings, except that the rigged colour's templates for a class all embed
        # to that class's crop embedding.
        out = real_text_embeddings(clf_, texts)
        for classname, (color, embedding) in target.items():
            if texts[0] == f"a photo of a {color} {classname}":
                out[:] = embedding
        return out

    monkeypatch.setattr(clip_colors, "text_embeddings", rigged)
    assert clip_colors.classify_colors(clf, image, dets) == ["purple", "brown"]
    logits = clip_colors.color_logits(clf, "car", crops[:1])
    assert logits.shape == (1, len(COLORS)) and abs(float(logits[0, COLORS.index("purple")]) - 100.0) < 1e-3
    assert float(logits.max()) <= 100.0 + 1e-3


# --- backend availability (no mmdet needed) ----------------------------------------------------------------------

def test_missing_backend_is_named_and_stops_the_evaluator_import(monkeypatch, tmp_path):
    import importlib
    import importlib.machinery
    import sys

    from evaluators import mmdet_backend

    real_find_spec = importlib.util.find_spec
    lite = importlib.machinery.ModuleSpec("mmcv", None, is_package=True)
    lite.submodule_search_locations = [str(tmp_path)]          # an mmcv folder without _ext*.so (mmcv-lite)
    fakes = {"mmdet": lite, "mmengine": lite, "mmcv": lite}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: fakes[name] if name in fakes else real_find_spec(name, *a))
    assert "no compiled ops" in mmdet_backend.missing_dependencies()
    (tmp_path / "_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert mmdet_backend.missing_dependencies() is None
    fakes["mmdet"] = None
    assert mmdet_backend.missing_dependencies() == "mmdet/mmengine are not installed"
    monkeypatch.delitem(sys.modules, "evaluators.geneval_official", raising=False)
    with pytest.raises(ImportError, match="make mmdet"):
        importlib.import_module("evaluators.geneval_official")


# --- tiny Mask2Former (real mmdet code; skipped where mmcv's compiled ops are missing) ---------------------------

MOUSE = 64   # COCO label whose GenEval name ("computer mouse") differs from mmdet's ("mouse")


def tiny_detector_config():
    """The official Swin-S Mask2Former config, shrunk: 1 Swin block per stage at width 32, 1 encoder and 1
    decoder layer at width 32, 10 queries, and a smaller test resize (the pipeline steps stay the same)."""
    from mmengine.config import Config

    from evaluators.mmdet_backend import official_config_path

    cfg = Config.fromfile(str(official_config_path()))
    width = 32
    attn = dict(embed_dims=width, num_heads=2)
    ffn = dict(embed_dims=width, feedforward_channels=2 * width)
    cfg.merge_from_dict({
        "model.backbone.embed_dims": width, "model.backbone.depths": [1, 1, 1, 1],
        "model.backbone.num_heads": [1, 2, 4, 8], "model.backbone.init_cfg": None,
        "model.panoptic_head.in_channels": [width, 2 * width, 4 * width, 8 * width],
        "model.panoptic_head.feat_channels": width, "model.panoptic_head.out_channels": width,
        "model.panoptic_head.num_queries": 10,
        "model.panoptic_head.positional_encoding.num_feats": width // 2,
        "model.panoptic_head.pixel_decoder.encoder.num_layers": 1,
        "model.panoptic_head.pixel_decoder.encoder.layer_cfg.self_attn_cfg": attn,
        "model.panoptic_head.pixel_decoder.encoder.layer_cfg.ffn_cfg": ffn,
        "model.panoptic_head.pixel_decoder.positional_encoding.num_feats": width // 2,
        "model.panoptic_head.transformer_decoder.num_layers": 1,
        "model.panoptic_head.transformer_decoder.layer_cfg.self_attn_cfg": attn,
        "model.panoptic_head.transformer_decoder.layer_cfg.cross_attn_cfg": attn,
        "model.panoptic_head.transformer_decoder.layer_cfg.ffn_cfg": ffn,
    })
    for step in cfg.test_dataloader.dataset.pipeline:
        if step["type"] == "Resize":
            step["scale"] = (256, 192)        # a 128x128 image runs at 192x192, then masks go back to 128
    return cfg


def downgrade_state_dict(state: dict) -> dict:
    """3.x Mask2Former keys -> the mmdet 2.x layout of GenEval's checkpoint (inverse of upgrade_state_dict)."""
    out = {}
    for key, value in state.items():
        new = key.replace(".ffn.", ".ffns.0.")
        if ".encoder.layers." in new:
            new = new.replace(".self_attn.", ".attentions.0.")
        elif ".transformer_decoder.layers." in new:
            new = new.replace(".cross_attn.", ".attentions.0.").replace(".self_attn.", ".attentions.1.")
        out[new] = value
    return out


@pytest.fixture(scope="module")
def tiny_detector_files(tmp_path_factory):
    """(folder holding the tiny model under GenEval's checkpoint name in 2.x layout, config, reference model)."""
    pytest.importorskip("mmcv._ext", reason="mmcv without compiled ops (run `make mmdet`)")
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from evaluators.mmdet_backend import CHECKPOINT_NAME

    register_all_modules()
    cfg = tiny_detector_config()
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():   # every query says "mouse", confidently, so the top detections are known
        head = model.panoptic_head
        head.cls_embed.weight.zero_()
        head.cls_embed.bias.fill_(0.0)
        head.cls_embed.bias[MOUSE] = 12.0
    folder = tmp_path_factory.mktemp("geneval_models")
    state = downgrade_state_dict(model.state_dict())
    assert any(".attentions.1." in k for k in state) and any(".ffns.0." in k for k in state)
    meta = {"CLASSES": mmdet_coco_classes(), "hook_msgs": {"best_score": np.float64(0.5)}}
    torch.save({"meta": meta, "state_dict": state}, folder / CHECKPOINT_NAME)
    return folder, cfg, model


def mmdet_coco_classes() -> tuple[str, ...]:
    from mmdet.datasets import CocoDataset
    return tuple(CocoDataset.METAINFO["classes"])


@pytest.fixture(scope="module")
def tiny_detector(tiny_detector_files):
    from evaluators.mmdet_backend import load_detector
    folder, cfg, _ = tiny_detector_files
    return load_detector(folder, config=cfg)


def test_missing_checkpoint_names_the_file_and_the_url(tmp_path, monkeypatch):
    from evaluators import mmdet_backend
    monkeypatch.delenv(mmdet_backend.MODELS_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="HARNESS_GENEVAL_MODELS"):
        mmdet_backend.load_detector()
    with pytest.raises(FileNotFoundError) as e:
        mmdet_backend.load_detector(tmp_path)
    assert mmdet_backend.CHECKPOINT_NAME in str(e.value) and "20220504_001756-743b7d99.pth" in str(e.value)


def test_key_upgrade_covers_every_renamed_layer():
    from evaluators.mmdet_backend import upgrade_state_dict
    old = {"panoptic_head.pixel_decoder.encoder.layers.0.attentions.0.value_proj.weight": 1,
           "panoptic_head.pixel_decoder.encoder.layers.0.ffns.0.layers.1.bias": 2,
           "panoptic_head.transformer_decoder.layers.3.attentions.0.attn.in_proj_weight": 3,
           "panoptic_head.transformer_decoder.layers.3.attentions.1.attn.out_proj.bias": 4,
           "panoptic_head.transformer_decoder.layers.3.norms.2.weight": 5,
           "backbone.stages.2.blocks.0.attn.w_msa.qkv.weight": 6}
    new = upgrade_state_dict(old)
    assert list(new) == ["panoptic_head.pixel_decoder.encoder.layers.0.self_attn.value_proj.weight",
                         "panoptic_head.pixel_decoder.encoder.layers.0.ffn.layers.1.bias",
                         "panoptic_head.transformer_decoder.layers.3.cross_attn.attn.in_proj_weight",
                         "panoptic_head.transformer_decoder.layers.3.self_attn.attn.out_proj.bias",
                         "panoptic_head.transformer_decoder.layers.3.norms.2.weight",
                         "backbone.stages.2.blocks.0.attn.w_msa.qkv.weight"]
    assert list(new.values()) == [1, 2, 3, 4, 5, 6] and upgrade_state_dict(new) == new   # 3.x keys stay


def test_load_detector_reads_the_2x_checkpoint_into_every_weight(tiny_detector_files, tiny_detector, tmp_path):
    from evaluators import mmdet_backend
    folder, cfg, reference = tiny_detector_files
    loaded = tiny_detector.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert not tiny_detector.training and tiny_detector.dataset_meta["classes"][MOUSE] == "mouse"
    # a checkpoint that lacks weights is refused, not silently half-random
    state = downgrade_state_dict(reference.state_dict())
    del state["panoptic_head.cls_embed.weight"]
    torch.save({"state_dict": state}, tmp_path / mmdet_backend.CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="cls_embed.weight"):
        mmdet_backend.load_detector(tmp_path, config=cfg)
    # a checkpoint for another label set is refused
    torch.save({"state_dict": state | {"panoptic_head.cls_embed.weight": reference.panoptic_head.cls_embed.weight},
                "meta": {"CLASSES": ("cat", "dog")}}, tmp_path / mmdet_backend.CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="COCO"):
        mmdet_backend.load_detector(tmp_path, config=cfg)


def test_detect_returns_geneval_names_boxes_scores_and_full_size_masks(tiny_detector, tmp_path):
    from mmdet.apis import inference_detector

    from evaluators.mmdet_backend import detect
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    dets = detect(tiny_detector, image)
    assert len(dets) == 100                                   # test_cfg.max_per_image
    for d in dets:
        assert set(d) == {"class", "bbox", "score", "mask"} and d["class"] in COCO_CLASSES
        assert len(d["bbox"]) == 4 and all(isinstance(v, float) for v in d["bbox"])
        assert d["bbox"][0] <= d["bbox"][2] and d["bbox"][1] <= d["bbox"][3]
        assert isinstance(d["score"], float) and 0.0 <= d["score"] <= 1.0
        assert d["mask"].shape == (128, 128) and d["mask"].dtype == bool
    best = max(dets, key=lambda d: d["score"])
    assert best["class"] == "computer mouse" and best["score"] > 0.3
    assert "mouse" not in {d["class"] for d in dets}
    # same result as GenEval's route: mmcv reading the PNG file itself (BGR), so the RGB->BGR flip is right
    Image.fromarray(image).save(tmp_path / "0000.png")
    by_file = inference_detector(tiny_detector, str(tmp_path / "0000.png")).pred_instances
    assert np.allclose([d["score"] for d in dets], by_file.scores.numpy())
    assert np.allclose([d["bbox"] for d in dets], by_file.bboxes.numpy())
    assert [d["class"] for d in dets] == [COCO_CLASSES[i] for i in by_file.labels.tolist()]
    with pytest.raises(ValueError, match="uint8"):
        detect(tiny_detector, image.astype(np.float32))


def test_geneval_evaluator_end_to_end_on_two_images(tiny_detector, tiny_clip_dir, monkeypatch):
    from evaluators import geneval_official
    from evaluators.base import Sample
    from harness import registry

    clf = clip_colors.load_clip(tiny_clip_dir)
    with torch.no_grad():   # every crop embeds to the same vector: the vision pooler's layer norm outputs its bias
        clf.model.vision_model.post_layernorm.weight.zero_()
        clf.model.vision_model.post_layernorm.bias.normal_()
    crop_embedding = clip_colors.image_embeddings(clf, [Image.new("RGB", (5, 7))])[0]
    real_text_embeddings = clip_colors.text_embeddings

    def purple_matches(clf_, texts):
        out = real_text_embeddings(clf_, texts)
        if "purple" in texts[0]:
            out[:] = crop_embedding
        return out

    monkeypatch.setattr(clip_colors, "text_embeddings", purple_matches)
    monkeypatch.setattr(geneval_official, "_DETECTOR", tiny_detector)
    monkeypatch.setattr(geneval_official, "_COLOR_CLASSIFIER", clf)
    evaluator = registry.get("evaluators", "geneval")
    assert evaluator is geneval_official.GENEVAL and evaluator.reward_field == "correct"

    rng = np.random.default_rng(3)
    purple = {"tag": "colors", "include": [{"class": "computer mouse", "count": 1, "color": "purple"}],
              "prompt": "a photo of a purple computer mouse"}
    two = {"tag": "two_object", "include": [{"class": "computer mouse", "count": 1}, {"class": "dog", "count": 1}],
           "prompt": "a photo of a computer mouse and a dog"}
    samples = [Sample(key=f"{i:05d}/0000", metadata=m, image=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
               for i, m in enumerate([purple, two])]
    result = evaluator.evaluate(samples)
    first, second = result.records["00000/0000"], result.records["00001/0000"]
    assert set(first) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert first["correct"] is True and first["reason"] == "" and json.loads(first["metadata"]) == purple
    mice = json.loads(first["details"])["computer mouse"]
    assert mice and all(len(row) == 5 and row[4] > 0.3 for row in mice)
    assert second["correct"] is False and second["reason"] == "expected dog>=1, found 0"
    assert set(clf.classifiers) == {"computer mouse"}          # colours only where a colour clause needs them
    metrics = {m.name: m.value for m in result.metrics}
    assert metrics["geneval_colors"] == 1.0 and metrics["geneval_two_object"] == 0.0
    assert metrics["geneval_overall"] == 0.5 and metrics["geneval_correct_images"] == 0.5


def test_missing_geneval_model_files_fail_before_any_image_is_drawn(tiny_detector_files, tiny_clip_dir, monkeypatch):
    """A suite or reward using "geneval" checks its two model files up front (not after an hour of generation),
    naming the file; with both present it resolves."""
    from evaluators import geneval_official, mmdet_backend
    from evaluators.run import resolve_evaluators
    from evaluators.suites import load_suite
    from trainers.rewards import build_reward

    folder, _, _ = tiny_detector_files
    monkeypatch.setattr(geneval_official, "_DETECTOR", None)
    monkeypatch.setattr(geneval_official, "_COLOR_CLASSIFIER", None)
    monkeypatch.setenv(clip_colors.CLIP_DIR_ENV, str(tiny_clip_dir))
    monkeypatch.setenv(mmdet_backend.MODELS_DIR_ENV, str(folder.parent / "nowhere"))
    for resolve in (lambda: resolve_evaluators(load_suite("geneval")), lambda: build_reward({"geneval": 1.0})):
        with pytest.raises(FileNotFoundError, match=mmdet_backend.CHECKPOINT_NAME):
            resolve()
    monkeypatch.setenv(mmdet_backend.MODELS_DIR_ENV, str(folder))
    monkeypatch.delenv(clip_colors.CLIP_DIR_ENV)
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        resolve_evaluators(load_suite("geneval"))
    monkeypatch.setenv(clip_colors.CLIP_DIR_ENV, str(tiny_clip_dir))
    assert [e.name for e in resolve_evaluators(load_suite("geneval"))] == ["geneval"]
    build_reward({"geneval": 1.0})
    assert geneval_official._DETECTOR is None          # checking loads nothing
