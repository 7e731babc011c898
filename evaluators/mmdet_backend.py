"""GenEval's detector: mmdet's Mask2Former Swin-S COCO instance-segmentation model (docs: evaluators.md 1.4).

`load_detector` builds the official config, shipped inside the mmdet wheel as
`mmdet/.mim/configs/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py` (mmdet 3.x name of the
2.x config GenEval names), and loads the checkpoint GenEval's download_models.sh saves as
`<dir>/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`. The config's test pipeline is the official one:
keep-ratio resize to (1333, 800), ImageNet mean/std on RGB, padding to a multiple of 32.

`detect` returns one dict per predicted instance: {"class", "bbox": [x1, y1, x2, y2], "score", "mask"}, the
class being GenEval's name (object_names.txt) for the COCO label. GenEval thresholds, sorts and truncates
these itself (evaluators/geneval.py), so nothing is filtered here.

mmdet, mmengine and mmcv (with compiled ops: `make mmdet`) are imported inside the functions, so importing
this module costs nothing where they are not installed.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.coco_prompts import COCO_CLASSES

CONFIG_NAME = "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py"
CHECKPOINT_NAME = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"
CHECKPOINT_URL = ("https://download.openmmlab.com/mmdetection/v2.0/mask2former/"
                  "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/"
                  "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth")
MODELS_DIR_ENV = "HARNESS_GENEVAL_MODELS"
# mmdet's COCO names that GenEval's object_names.txt spells differently (same label index).
RENAMED = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def missing_dependencies() -> str | None:
    """Why the mmdet backend cannot run here (None when it can), found without importing anything heavy."""
    if importlib.util.find_spec("mmdet") is None or importlib.util.find_spec("mmengine") is None:
        return "mmdet/mmengine are not installed"
    spec = importlib.util.find_spec("mmcv")
    if spec is None or not spec.submodule_search_locations:
        return "mmcv is not installed"
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not any(package_dir.glob("_ext*.so")) and not any(package_dir.glob("_ext*.pyd")):
        return f"mmcv at {package_dir} has no compiled ops (mmcv._ext; mmcv-lite is not enough)"
    return None


def official_config_path() -> Path:
    """The official config file inside the installed mmdet package."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mmdet is not installed; run `make mmdet` (compiles mmcv 2.1.0, then installs mmdet 3.3.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / ".mim" / "configs" / "mask2former" / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the mmdet package has no {path}; install the mmdet==3.3.0 wheel, which ships "
                                f"its configs under mmdet/.mim/configs")
    return path


def checkpoint_path(checkpoint_dir: str | os.PathLike | None = None) -> Path:
    """`<dir>/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`, dir = argument or $HARNESS_GENEVAL_MODELS."""
    raw = checkpoint_dir if checkpoint_dir is not None else os.environ.get(MODELS_DIR_ENV)
    fix = (f"download {CHECKPOINT_URL} and save it as <dir>/{CHECKPOINT_NAME} (GenEval's download_models.sh "
           f"does this), then pass <dir> or set ${MODELS_DIR_ENV}=<dir>")
    if not raw:
        raise FileNotFoundError(f"no GenEval model folder given for {CHECKPOINT_NAME}: {fix}")
    path = Path(raw).expanduser() / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"GenEval detector checkpoint not found: {path}; {fix}")
    return path


def load_detector(checkpoint_dir: str | os.PathLike | None = None, config: Any = None, device: str = "cpu"):
    """The GenEval Mask2Former in eval mode on `device`.

    config: None for the official file, or a path / mmengine Config (tests use a reduced one). The backbone's
    init_cfg is cleared so that building the model never fetches ImageNet weights; the checkpoint then
    replaces every weight. GenEval's checkpoint is in mmdet 2.x layout; its keys are renamed to 3.x
    (`upgrade_state_dict`), and a weight the file does not provide is an error, not a silent random init.
    """
    import copy
    import warnings

    path = checkpoint_path(checkpoint_dir)       # a missing file is reported before the slow imports
    from mmdet.apis import init_detector
    from mmengine.config import Config

    if isinstance(config, Config):
        cfg, config_name = copy.deepcopy(config), "the given config"
    else:
        cfg = Config.fromfile(str(config or official_config_path()))
        config_name = Path(str(config or CONFIG_NAME)).name
    cfg.model.backbone.init_cfg = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "checkpoint is None, use COCO classes": the weights follow
        model = init_detector(cfg, None, device="cpu")
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state_dict; expected the mmdet checkpoint from {CHECKPOINT_URL}")
    missing, unexpected = model.load_state_dict(upgrade_state_dict(state), strict=False)
    if missing:
        raise ValueError(f"{path} does not fit {config_name}: {len(missing)} model weights "
                         f"missing from the file (e.g. {', '.join(missing[:3])}); GenEval needs {CHECKPOINT_URL}")
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} checkpoint entries not used by the model "
                      f"(e.g. {', '.join(unexpected[:3])})")
    meta = checkpoint.get("meta", {}) or {}
    classes = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES")  # 3.x, then 2.x
    if classes is not None:
        model.dataset_meta = dict(model.dataset_meta or {}, classes=tuple(classes))
    check_classes(model)
    return model.to(device).eval()


def read_checkpoint(path: Path) -> dict:
    """torch.load without running pickled code (weights_only). mmdet's training metadata can hold numpy
    scalars (e.g. a best score), so those few numpy types, and nothing else, are allowed on a second try."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    scalar = np._core.multiarray.scalar
    allowed = [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),   # numpy 1 pickles use the old path
               np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType, np.dtypes.Int32DType,
               np.dtypes.BoolDType]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"cannot read the detector checkpoint {path} as plain tensors and metadata ({e}); "
                         f"re-download it from {CHECKPOINT_URL}") from e


def upgrade_state_dict(state: dict) -> dict:
    """mmdet 2.x Mask2Former keys -> mmdet 3.x (a no-op on 3.x keys).

    2.x built its transformer layers from generic lists: `attentions.<i>` in operation order and `ffns.0`.
    3.x names them: in the pixel decoder's encoder layers attentions.0 is `self_attn`; in the query decoder
    layers (order cross_attn, norm, self_attn, norm, ffn, norm) attentions.0 is `cross_attn` and
    attentions.1 is `self_attn`. Norm indices keep their order, and all shapes are unchanged.
    """
    out = {}
    for key, value in state.items():
        new = key.replace(".ffns.0.", ".ffn.")
        if ".encoder.layers." in new:
            new = new.replace(".attentions.0.", ".self_attn.")
        elif ".transformer_decoder.layers." in new:
            new = new.replace(".attentions.0.", ".cross_attn.").replace(".attentions.1.", ".self_attn.")
        out[new] = value
    return out


def check_classes(model) -> None:
    """ValueError unless the model's label set is COCO's 80 classes in COCO order (GenEval maps by index)."""
    classes = (getattr(model, "dataset_meta", None) or {}).get("classes")
    if classes is None:
        return  # a checkpoint without meta: mmdet falls back to COCO names itself
    spaced = [str(c).replace("_", " ") for c in classes]   # mmdet's get_classes("coco") writes "traffic_light"
    names = [RENAMED.get(c, c) for c in spaced]
    if list(names) != list(COCO_CLASSES):
        raise ValueError(f"detector classes are not COCO's 80 in COCO order (got {len(names)}: "
                         f"{', '.join(names[:5])}, ...); GenEval needs the COCO instance checkpoint {CHECKPOINT_NAME}")


def detect(model, image: np.ndarray) -> list[dict]:
    """All instances the detector returns for one RGB uint8 image [H, W, 3], in mmdet's order (the order
    GenEval's per-class arrays keep; its engine sorts by score itself):
    {"class": GenEval name, "bbox": [x1, y1, x2, y2] floats, "score": float, "mask": bool [H, W]}."""
    import copy

    from mmcv.transforms import Compose
    from mmdet.apis import inference_detector
    from mmdet.utils import get_test_pipeline_cfg

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detect: image must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
    # mmdet, like GenEval's file loading through mmcv, expects BGR and converts to RGB in its preprocessor.
    # The config's test pipeline with the array loader in front; a deep copy, because mmdet's own ndarray
    # branch edits model.cfg in place and would break later file-path calls.
    steps = copy.deepcopy(get_test_pipeline_cfg(model.cfg))
    steps[0]["type"] = "mmdet.LoadImageFromNDArray"
    result = inference_detector(model, np.ascontiguousarray(image[:, :, ::-1]), test_pipeline=Compose(steps))
    instances = result.pred_instances
    if "masks" not in instances:
        raise RuntimeError("the detector returned no instance masks; GenEval needs the instance-segmentation "
                           f"Mask2Former ({CONFIG_NAME}) for its colour crops")
    labels = instances.labels.cpu().numpy()
    scores = instances.scores.float().cpu().numpy()
    boxes = instances.bboxes.float().cpu().numpy()
    masks = instances.masks.cpu().numpy().astype(bool)
    if masks.shape[1:] != image.shape[:2]:
        raise RuntimeError(f"detector masks are {masks.shape[1:]}, not the image size {image.shape[:2]}")
    return [{"class": COCO_CLASSES[int(labels[k])], "bbox": [float(v) for v in boxes[k]],
             "score": float(scores[k]), "mask": masks[k]} for k in range(len(labels))]
