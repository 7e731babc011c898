"""HPS v2 / v2.1 as the PyPI package `hpsv2` 1.2.0 scores, in the `hpsv2-official` env (harness/envs.py).

hpsv2.img_score.score() cannot run offline (initialize_model asks open_clip for the LAION ViT-H-14 weights before
it loads the HPS checkpoint, ../shared/docs/dependencies.md), so this worker makes the same calls in the same order
without that download: hpsv2's vendored open_clip create_model_and_transforms('ViT-H-14', None, precision='amp', ...
the arguments initialize_model passes), model.load_state_dict(torch.load(cp)['state_dict']), get_tokenizer, and
per image img_score's body: preprocess_val(PIL image), tokenizer([prompt]), model(image, text) under
torch.cuda.amp.autocast(), the diagonal of image_features @ text_features.T.

op "score": {"checkpoint": PT, "items": [{"image": PNG, "prompt": str}, ...], "model_config": null | JSON}
  -> [float per item] (a cosine; the harness reports 100 x it). "model_config" registers an open_clip model
  config (tests with tiny random weights) and uses its name instead of ViT-H-14.
"""
import warnings

import wire

wire.take_stdout()
wire.torchvision_shim()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hpsv2.src.open_clip import add_model_config, create_model_and_transforms, get_tokenizer  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)       # as img_score does
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_MODELS = {}


def _model(checkpoint, model_config=None):
    key = (checkpoint, model_config)
    if key not in _MODELS:
        name = "ViT-H-14"
        if model_config:
            add_model_config(model_config)
            name = model_config.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        model, _, preprocess_val = create_model_and_transforms(
            name, None, precision="amp", device=DEVICE, jit=False, force_quick_gelu=False, force_custom_text=False,
            force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
            light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
            with_region_predictor=False)
        state = torch.load(checkpoint, map_location=DEVICE, weights_only=True)
        model.load_state_dict(state["state_dict"])
        model = model.to(DEVICE).eval()
        _MODELS[key] = (model, preprocess_val, get_tokenizer(name))
    return _MODELS[key]


def score(checkpoint, items, model_config=None):
    model, preprocess_val, tokenizer = _model(checkpoint, model_config)
    out = []
    for item in items:
        with torch.no_grad(), Image.open(item["image"]) as im:
            image = preprocess_val(im).unsqueeze(0).to(device=DEVICE, non_blocking=True)
            text = tokenizer([item["prompt"]]).to(device=DEVICE, non_blocking=True)
            with torch.cuda.amp.autocast():
                outputs = model(image, text)
                image_features, text_features = outputs["image_features"], outputs["text_features"]
                logits_per_image = image_features @ text_features.T
                hps_score = torch.diagonal(logits_per_image).cpu().numpy()
        out.append(float(hps_score[0]))
    return out


if __name__ == "__main__":
    wire.main("hpsv2-official", {"score": score}, ("hpsv2", "torch", "torchvision", "timm"))
