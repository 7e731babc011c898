"""DPG-Bench's VQA judge as modelscope runs it, in the `dpg-official` env (harness/envs.py; recipe B of
../shared/docs/dpg_vqa.md: the MPlug model class without the pipeline module, which would need fairseq).

op "answer": {"model_dir": DIR, "items": [{"image": PNG, "questions": [...]}, ...]}
  -> [[{"ids": [...], "text": str, "score": float}, ...] per item]
Each question is answered as the VQA pipeline answers it, one question at a time with the image encoded anew:
MPlug.from_pretrained(DIR, task=visual-question-answering); the MPlugPreprocessor's image transform (convert RGB,
Resize((res, res), bicubic), ToTensor, Normalize(CLIP mean / std)) and question rule (lower case, padded and
truncated to 25 tokens); model(image, question, train=False); BertTokenizer.decode(ids, skip_special_tokens=True).
op "info": {"model_dir": DIR} -> the model's image_res, generation settings and load report.
"""
import wire

wire.take_stdout()
wire.torchvision_shim()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from modelscope.models.multi_modal.mplug.modeling_mplug import MPlug  # noqa: E402
from modelscope.utils.constant import Tasks  # noqa: E402

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_MODELS = {}


def model(model_dir):
    if model_dir not in _MODELS:
        m = MPlug.from_pretrained(model_dir, task=Tasks.visual_question_answering).eval()
        res = m.config.image_res
        tf = transforms.Compose([transforms.Resize((res, res), interpolation=Image.BICUBIC), transforms.ToTensor(),
                                 transforms.Normalize(MEAN, STD)])
        _MODELS[model_dir] = (m, tf)
    return _MODELS[model_dir]


def answer(model_dir, items):
    m, tf = model(model_dir)
    out = []
    for item in items:
        with Image.open(item["image"]) as im:
            pixels = tf(im.convert("RGB")).unsqueeze(0)
        row = []
        for q in item["questions"]:
            tokens = m.tokenizer(q.lower(), padding="max_length", truncation=True, max_length=25, return_tensors="pt")
            with torch.no_grad():
                ids, scores = m(pixels.clone(), tokens, train=False)
            row.append({"ids": ids[0][0].tolist(), "score": float(scores[0][0]),
                        "text": m.tokenizer.decode(ids[0][0], skip_special_tokens=True)})
        out.append(row)
    return out


def info(model_dir):
    m, _ = model(model_dir)
    c = m.config
    return {"image_res": c.image_res, "beam_size": c.beam_size, "min_length": c.min_length,
            "max_length": c.max_length}


if __name__ == "__main__":
    wire.main("dpg-official", {"answer": answer, "info": info},
              ("modelscope", "transformers", "torch", "timm", "torchvision"))
