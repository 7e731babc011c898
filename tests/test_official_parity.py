"""Parity of the native scorers with the official stacks run as workers in their own envs (harness/envs.py):
`dpg` vs `dpg-official` (modelscope 1.40.2's MPlug) and `imagereward` vs `imagereward-official` (PyPI
image-reward 1.5), on tiny random weights saved in the official formats. Each test skips, with the command that
builds its env, where the env is not built, and runs only when asked for (-m worker_env, or
$HARNESS_WORKER_ENV_TESTS=1 as .ci/run's optional step sets), so `make test` stays fast."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from evaluators import official
from evaluators.base import Sample
from harness import envs, registry, worker

import worker_env

pytestmark = pytest.mark.worker_env


def needs(name: str):
    """The test runs in env `name` (tests/worker_env.py: built, and asked for with -m worker_env)."""
    def decorate(test):
        return pytest.mark.usefixtures(f"env_{name.replace('-', '_')}")(test)
    return decorate


@pytest.fixture
def env_dpg_official(request):
    worker_env.require(request, "dpg-official")


@pytest.fixture
def env_imagereward_official(request):
    worker_env.require(request, "imagereward-official")


@pytest.fixture(autouse=True)
def one_thread_workers(monkeypatch):
    monkeypatch.setenv(official.THREADS_ENV, "1")
    yield
    worker.close_all()


# --- dpg vs dpg-official ----------------------------------------------------------------------------------------

# modelscope builds its CLIP from config.yaml's clip_* values (ours reads the sizes off the checkpoint): the tiny
# vision tower of tests/test_mplug.py (ViT-B-16 naming, width 768, 1 layer, 32 px) and a small text tower it never runs
CLIP_CONFIG = {"clip_embed_dim": 64, "clip_image_resolution": 32, "clip_vision_layers": 1, "clip_vision_width": 768,
               "clip_vision_patch_size": 16, "clip_context_length": 8, "clip_vocab_size": 50,
               "clip_transformer_width": 64, "clip_transformer_heads": 1, "clip_transformer_layers": 1}

@pytest.fixture(scope="module")
def mplug_dirs(tmp_path_factory):
    """Tiny random mPLUGs in modelscope's layout (tests/test_mplug.py's builders): random long answers, forced yes,
    forced no, early [SEP] with min_length 3 and beam 3."""
    import test_mplug as T
    from evaluators import mplug as M
    root = tmp_path_factory.mktemp("mplug-parity")
    cases = {"random": T.tiny(seed=21), "yes": T.biased(22, {T.YES: 40.0, M.END_ID: 80.0}),
             "no": T.biased(23, {T.NO: 40.0, M.END_ID: 80.0}),
             "short": T.biased(24, {M.END_ID: 3.0}, gen=M.Generation(3, 3, 8))}
    out = {}
    for name, model in cases.items():
        folder = M.write_model_dir(model, root / name, T.VOCAB, image_res=32, vision_width=768, bert_config=T.BERT,
                                   clip_name="ViT-B-16", wrap="module")
        config = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump({**config, **CLIP_CONFIG}))
        out[name] = folder
    return out


@needs("dpg-official")
def test_dpg_judge_answers_equal_modelscope_in_the_worker(mplug_dirs):
    import test_mplug as T
    from evaluators import mplug as M
    ims = T.images(3, seed=9)
    arrays = [np.asarray(im.convert("RGB")) for im in ims]
    n, kinds, worst = 0, set(), 0.0
    for name, folder in mplug_dirs.items():
        native = M.MPlugJudge(*M.load_mplug(folder)).answer_many(ims, [T.QUESTIONS] * len(ims))
        theirs = official.OfficialJudge(folder).answer_many(arrays, [T.QUESTIONS] * len(ims))
        for row, other in zip(native, theirs):
            for q, a, b in zip(T.QUESTIONS, row, other):
                assert (a.ids, a.text) == (b.ids, b.text), (name, q, a, b)
                worst = max(worst, abs(a.score - b.score))
                assert a.score == b.score, (name, q, a.score, b.score)
                kinds.add(a.text if a.text in ("yes", "no") else "other")
                n += 1
    print(f"\ndpg vs dpg-official: {n} answers, ids and text equal, largest beam-score difference {worst:g}")
    assert n >= 12 and kinds == {"yes", "no", "other"}


@needs("dpg-official")
def test_dpg_official_evaluator_records_equal_the_native_ones(mplug_dirs, tmp_path, monkeypatch):
    from evaluators import dpg_judge
    from evaluators import mplug as M
    from test_mplug import CSV_HEADER
    rows = ["skipped,,,1,0,,,entity - whole (cat),is there a cat?",
            "p1,,,1,0,,,entity - whole (cat),is there a cat?",
            "p1,,,2,1,,,attribute - color (cat red),is the cat red?",
            "p2,,,1,0,,,entity - whole (dog),is there a dog?",
            "p2,,,2,1,,,other - count (dog 2),are there two dogs?"]
    csv = tmp_path / "dpg_bench.csv"
    csv.write_text(CSV_HEADER + "\n".join(rows) + "\n")
    monkeypatch.setenv(dpg_judge.CSV_ENV, str(csv))
    monkeypatch.setenv(dpg_judge.ANSWERS_ENV, str(tmp_path / "answers.sqlite"))
    monkeypatch.setattr(dpg_judge, "_JUDGES", {})
    rng = np.random.default_rng(4)
    samples = [Sample(key=f"{p}/{t}", metadata={"item_id": p, "prompt": p},
                      image=rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for p in ("p1", "p2") for t in range(4)]
    for name in ("random", "yes"):
        monkeypatch.setenv(M.DIR_ENV, str(mplug_dirs[name]))
        ours, theirs = registry.get("evaluators", "dpg"), registry.get("evaluators", "dpg-official")
        theirs.check_ready()
        a, b = ours.evaluate(samples), theirs.evaluate(samples)
        assert a.records == b.records, name
        assert [m.as_dict() for m in a.metrics] == [m.as_dict() for m in b.metrics]
        if name == "yes":
            assert {m.name: m.value for m in b.metrics}["dpg_overall"] == 100.0


# --- imagereward vs imagereward-official ----------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "dog", "and", "cat", "two", "green"]
VIT = {"width": 128, "depth": 2, "heads": 2, "patch": 16}
TEXT = 768          # ImageReward hard-codes MLP(768): the text width must be BERT-base's
MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.0, "hidden_size": TEXT, "initializer_range": 0.02, "intermediate_size": 256,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 12,
       "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(WORDS) + 2,
       "encoder_width": VIT["width"], "add_cross_attention": True}


@pytest.fixture(scope="module")
def imagereward_dir(tmp_path_factory):
    """ImageReward.pt under the official key names: BLIP ViT (tiny), med BERT (2 layers at width 768), MLP."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape, s=0.05: s * torch.randn(*shape, generator=g)
    w, p = VIT["width"], VIT["patch"]
    v = "blip.visual_encoder."
    state = {v + "cls_token": rand(1, 1, w), v + "pos_embed": rand(1, (224 // p) ** 2 + 1, w),
             v + "patch_embed.proj.weight": rand(w, 3, p, p), v + "patch_embed.proj.bias": rand(w),
             v + "norm.weight": 1 + rand(w), v + "norm.bias": rand(w)}
    for i in range(VIT["depth"]):
        b = f"blip.visual_encoder.blocks.{i}."
        for name, shape in (("norm1", (w,)), ("norm2", (w,))):
            state[b + name + ".weight"], state[b + name + ".bias"] = 1 + rand(*shape), rand(*shape)
        for name, (n_out, n_in) in (("attn.qkv", (3 * w, w)), ("attn.proj", (w, w)), ("mlp.fc1", (4 * w, w)),
                                    ("mlp.fc2", (w, 4 * w))):
            state[b + name + ".weight"], state[b + name + ".bias"] = rand(n_out, n_in), rand(n_out)
    torch.manual_seed(1)
    text = BlipTextModel(BlipTextConfig(vocab_size=MED["vocab_size"], hidden_size=TEXT, encoder_hidden_size=w,
                                        intermediate_size=MED["intermediate_size"], num_hidden_layers=2,
                                        num_attention_heads=12, max_position_embeddings=40, bos_token_id=None,
                                        sep_token_id=None, eos_token_id=None), add_pooling_layer=False)
    state.update({"blip.text_encoder." + k: v.detach().clone() for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1).clone()
    state.update({"blip.vision_proj.weight": rand(256, w), "blip.vision_proj.bias": rand(256),
                  "blip.text_proj.weight": rand(256, TEXT), "blip.text_proj.bias": rand(256)})
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((TEXT, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"] = rand(n_out, n_in, s=0.1), rand(n_out)
    folder = tmp_path_factory.mktemp("imagereward-parity")
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED))
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return folder


@needs("imagereward-official")
def test_imagereward_equals_the_official_package_in_the_worker(imagereward_dir, monkeypatch):
    from evaluators import imagereward
    monkeypatch.setenv(imagereward.DIR_ENV, str(imagereward_dir))
    monkeypatch.setattr(imagereward, "_LOADED", {})
    assert official.checkpoint_vit(imagereward_dir / "ImageReward.pt") == VIT
    rng = np.random.default_rng(5)
    prompts = ["a photo of a red dog", "two green cat and a dog", "a cat", "red", "a photo of two dog and a cat"]
    samples = [Sample(key=f"{i:05d}/0000", metadata={"prompt": p},
                      image=rng.integers(0, 256, (180 + 37 * i, 240 - 11 * i, 3), dtype=np.uint8))
               for i, p in enumerate(prompts * 2)]
    ours = registry.get("evaluators", "imagereward").evaluate(samples)
    theirs_evaluator = registry.get("evaluators", "imagereward-official")
    theirs_evaluator.check_ready()
    theirs = theirs_evaluator.evaluate(samples)
    a = np.array([ours.records[s.key]["score"] for s in samples])
    b = np.array([theirs.records[s.key]["score"] for s in samples])
    diff = float(np.abs(a - b).max())
    print(f"\nimagereward vs imagereward-official: {len(a)} images, scores {a.min():.3f}..{a.max():.3f} "
          f"(std {a.std():.3f}), largest difference {diff:.3g}")
    assert a.std() > 0.05                      # the weights make the scores differ, so equality means something
    assert diff <= 1e-5 * max(1.0, float(np.abs(a).max()))       # float32 rounding of two summation orders
    keys = worker.shared([envs.require("imagereward-official"), official.WORKERS / "imagereward_worker.py", "1"],
                         name="imagereward-official").request(
        "keys", {"checkpoint": str(imagereward_dir / "ImageReward.pt"),
                 "med_config": str(imagereward_dir / "med_config.json"), "tokenizer_dir": str(imagereward_dir),
                 "vit": VIT}, timeout=300)
    assert keys["unexpected"] == [] and [k for k in keys["missing"] if "position_ids" not in k] == []
