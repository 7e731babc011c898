"""Parity oracle for tests/test_mplug.py, run by the python of a separate modelscope venv (recipe B of
../shared/docs/dpg_vqa.md: modelscope 1.40.2, transformers 4.57.6, timm, torchvision 0.28.0 + the tv_compat shim).

usage: VENV/bin/python tests/mplug_oracle.py FOLDER
FOLDER holds config_bert.json, vocab.txt, questions.json and im*.png. For a few (seed, decoder bias) cases it
builds modelscope's MPlugForVisualQuestionAnswering on a tiny config with random weights, saves it as a model
folder FOLDER/<case>/ (modelscope's own state dict, momentum copies and all), reloads it with
MPlug.from_pretrained, answers every question on every image the way the VQA pipeline does, and writes
FOLDER/oracle.json: [{"dir", "answers": [[{"ids", "text", "score"}, ...] per image]}].
"""
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch


def _shim():   # PyPI torchvision beside CPU torch (../shared/docs/dependencies.md, tv_compat)
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    d = list(spec.submodule_search_locations)[0]
    for name in ("_C_stable.so", "_C.so"):
        try:
            torch.ops.load_library(os.path.join(d, name))
            return
        except (OSError, RuntimeError):
            pass
    global _LIB
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_shim()
import re  # noqa: E402

from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from modelscope.models.multi_modal.mplug.modeling_mplug import MPlug  # noqa: E402
from modelscope.utils.constant import Tasks  # noqa: E402

CONFIG = {"task": "visual-question-answering", "bert_config": "config_bert.json", "image_res": 32,
          "vision_width": 768, "distill": True, "clip_name": "ViT-B-16", "beam_size": 5, "min_length": 1,
          "max_length": 10, "clip_embed_dim": 64, "clip_image_resolution": 32, "clip_vision_layers": 1,
          "clip_vision_width": 768, "clip_vision_patch_size": 16, "clip_context_length": 8, "clip_vocab_size": 50,
          "clip_transformer_width": 64, "clip_transformer_heads": 1, "clip_transformer_layers": 1}
CASES = [("random", 11, {}), ("yes", 12, {"yes": 40.0, "[SEP]": 80.0}), ("no", 13, {"no": 40.0, "[SEP]": 80.0}),
         ("short", 14, {"[SEP]": 2.5})]


def main(folder: Path) -> None:
    import yaml
    vocab = (folder / "vocab.txt").read_text().splitlines()
    questions = json.loads((folder / "questions.json").read_text())
    images = sorted(folder.glob("im*.png"))
    out = []
    for name, seed, bias in CASES:
        d = folder / name
        d.mkdir(exist_ok=True)
        for f in ("config_bert.json", "vocab.txt"):
            shutil.copy(folder / f, d / f)
        (d / "configuration.json").write_text(json.dumps({"framework": "pytorch", "task": "visual-question-answering",
                                                          "model": {"type": "mplug"},
                                                          "pipeline": {"type": "visual-question-answering"}}))
        (d / "config.yaml").write_text(yaml.safe_dump(CONFIG))
        model = MPlug.from_pretrained(str(d), task=Tasks.visual_question_answering, load_checkpoint=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if re.search(r"(LayerNorm|ln_\w+|layer_norm)\.weight$", pname):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
            for token, value in bias.items():
                model.text_decoder.cls.predictions.bias[vocab.index(token)] += value
        torch.save(model.state_dict(), d / "pytorch_model.bin")
        model = MPlug.from_pretrained(str(d), task=Tasks.visual_question_answering).eval()
        res = model.config.image_res
        tf = transforms.Compose([transforms.Resize((res, res), interpolation=Image.BICUBIC), transforms.ToTensor(),
                                 transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                      (0.26862954, 0.26130258, 0.27577711))])
        answers = []
        for path in images:
            image = tf(Image.open(path).convert("RGB")).unsqueeze(0)
            row = []
            for q in questions:
                tokens = model.tokenizer(q.lower(), padding="max_length", truncation=True, max_length=25,
                                         return_tensors="pt")
                with torch.no_grad():
                    ids, scores = model(image, tokens, train=False)
                row.append({"ids": ids[0][0].tolist(), "score": float(scores[0][0]),
                            "text": model.tokenizer.decode(ids[0][0], skip_special_tokens=True)})
            answers.append(row)
        out.append({"dir": name, "answers": answers})
    (folder / "oracle.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
