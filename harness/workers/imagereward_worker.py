"""ImageReward as the PyPI package `image-reward` 1.5 scores, in the `imagereward-official` env (harness/envs.py).

The package runs on transformers 4.57.6 + timm 0.6.13 with the two patches of ../shared/docs/dependencies.md,
applied here at run time (the env's files are not changed):
  (a) transformers 4.57 moved apply_chunking_to_forward / find_pruneable_heads_and_indices / prune_linear_layer
      to transformers.pytorch_utils; ImageReward's med.py imports them from transformers.modeling_utils;
  (b) BLIP's init_tokenizer hard-codes BertTokenizer.from_pretrained('bert-base-uncased') (a hub download): the
      name is resolved to a local folder holding bert-base-uncased's vocab.txt; init_tokenizer itself runs unchanged.

op "score": {"checkpoint": ImageReward.pt, "med_config": med_config.json, "tokenizer_dir": DIR,
             "items": [{"image": PNG, "prompt": str}, ...], "vit": null | {"width", "depth", "heads", "patch"}}
  -> [float per item]: ImageReward.load(checkpoint, device, med_config=...) then model.score(prompt, PIL image),
  the package's single-image path. "vit" replaces the hard-coded ViT-L size (tests on tiny random weights only).
op "keys": the same load -> {"missing": [...], "unexpected": [...]} of load_state_dict(strict=False).
"""
import wire

wire.take_stdout()
wire.torchvision_shim()

import torch  # noqa: E402
import transformers.modeling_utils as _mu  # noqa: E402
import transformers.pytorch_utils as _pu  # noqa: E402

for _name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):   # patch (a)
    if not hasattr(_mu, _name):
        setattr(_mu, _name, getattr(_pu, _name))

from PIL import Image  # noqa: E402

import ImageReward as RM  # noqa: E402
from ImageReward.models.BLIP import blip as _blip, blip_pretrain as _blip_pretrain  # noqa: E402

_TOKENIZER_DIR = {"dir": None}
_OFFICIAL_TOKENIZER = _blip.BertTokenizer
_OFFICIAL_CREATE_VIT = _blip_pretrain.create_vit
_MODELS = {}


class _LocalBertTokenizer(_OFFICIAL_TOKENIZER):                                                       # patch (b)
    @classmethod
    def from_pretrained(cls, name, *args, **kwargs):
        if name == "bert-base-uncased" and _TOKENIZER_DIR["dir"]:
            name, kwargs = _TOKENIZER_DIR["dir"], {**kwargs, "local_files_only": True}
        return super().from_pretrained(name, *args, **kwargs)


_blip.BertTokenizer = _LocalBertTokenizer


def _load(checkpoint, med_config, tokenizer_dir, vit=None):
    key = (checkpoint, med_config, tokenizer_dir, str(vit))
    if key not in _MODELS:
        _TOKENIZER_DIR["dir"] = tokenizer_dir
        if vit:
            def create_vit(name, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
                encoder = _blip.VisionTransformer(img_size=image_size, patch_size=vit["patch"], embed_dim=vit["width"],
                                                  depth=vit["depth"], num_heads=vit["heads"],
                                                  use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                                  drop_path_rate=drop_path_rate)
                return encoder, vit["width"]
            _blip_pretrain.create_vit = create_vit
        try:
            model = RM.load(checkpoint, device="cpu", med_config=med_config)
        finally:
            _blip_pretrain.create_vit = _OFFICIAL_CREATE_VIT
        _MODELS[key] = model
    return _MODELS[key]


def score(checkpoint, med_config, tokenizer_dir, items, vit=None):
    model = _load(checkpoint, med_config, tokenizer_dir, vit)
    out = []
    with torch.no_grad():
        for item in items:
            with Image.open(item["image"]) as im:
                out.append(float(model.score(item["prompt"], im.convert("RGB"))))
    return out


def keys(checkpoint, med_config, tokenizer_dir, vit=None):
    model = _load(checkpoint, med_config, tokenizer_dir, vit)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    have = set(model.state_dict())
    return {"missing": sorted(have - set(state)), "unexpected": sorted(set(state) - have)}


if __name__ == "__main__":
    wire.main("imagereward-official", {"score": score, "keys": keys},
              ("image-reward", "transformers", "timm", "torch", "torchvision"))
