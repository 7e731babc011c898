"""mPLUG-large VQA (DPG's judge) on a tiny random model saved in modelscope's format (config of
../shared/docs/dpg_vqa.md section 7: ViT-B-16 naming, 32 px, BERT width 64, 3 of 6 fusion layers run with
stride 2, so one connected-attention layer runs), and the `dpg` evaluator end to end."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluators import mplug as M

BERT = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 116,
        "max_position_embeddings": 64, "num_hidden_layers": 6, "text_encoder_layers": 1, "fusion_layers": 3,
        "text_decode_layers": 2, "stride_layer": 2, "encoder_width": 64, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu", "type_vocab_size": 2, "pad_token_id": 0}
WORDS = "yes no is there a cat dog red the ? ##s blue".split()
VOCAB = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
YES, NO = VOCAB.index("yes"), VOCAB.index("no")
def _modelscope_python() -> Path:
    """The `dpg-official` env's python when built (`harness env build dpg-official`), else a hand-made venv."""
    from harness import envs
    if envs.state("dpg-official") == "built":
        return envs.python_of(envs.env_dir("dpg-official"))
    return Path("/tmp/msenv/bin/python")


MODELSCOPE_PY = _modelscope_python()
QUESTIONS = ["is there a cat?", "is the dog red?", "Is There A Blue Cats?", "yes no", "a",
             "the red dog is there? " * 6]   # the last is longer than 25 tokens: truncated


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed=0, std=0.5, gen=M.Generation(5, 1, 10)):
    return M.random_model(BERT, image_res=32, patch=16, width=768, layers=1, vision_width=768, seed=seed,
                          std=std, generation=gen)


def extras(model) -> dict:
    """Keys a modelscope checkpoint holds that inference never reads."""
    out = {"visual_encoder_m.visual.conv1.weight": torch.zeros(768, 3, 16, 16),
           "text_decoder_m.cls.predictions.bias": torch.zeros(116),
           "visual_encoder.token_embedding.weight": torch.zeros(10, 8), "visual_encoder.logit_scale": torch.zeros(()),
           "visual_encoder.visual.proj": torch.zeros(768, 512),
           "text_encoder.embeddings.position_ids": torch.arange(64)[None],
           "text_decoder.cls.predictions.decoder.bias": model.text_decoder.cls.predictions.bias.detach().clone()}
    out.update({k.replace("layer.3.", "layer.0."): torch.zeros_like(v) for k, v in model.state_dict().items()
                if k.startswith("fusion_encoder.encoder.layer.3.")})     # a never-run fusion layer
    return out


def write(model, folder, **kw):
    return M.write_model_dir(model, folder, VOCAB, image_res=32, vision_width=768, bert_config=BERT,
                             clip_name="ViT-B-16", extra=extras(model), **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write(tiny(), tmp_path_factory.mktemp("mplug") / "m", wrap="module")


@pytest.fixture(scope="module")
def judge(model_dir):
    return M.MPlugJudge(*M.load_mplug(model_dir))


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 36, 3), dtype=np.uint8)) for i in range(n)]


# --- files and loading ------------------------------------------------------------------------------------------

def test_missing_files_are_named_with_where_they_come_from(tmp_path, monkeypatch, model_dir):
    monkeypatch.delenv(M.DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"no folder given.*{M.MODEL_ID}.*{M.DIR_ENV}"):
        M.model_folder()
    for name in ("pytorch_model.bin", "config.yaml", "config_bert.json", "vocab.txt", "configuration.json"):
        folder = tmp_path / name
        folder.mkdir()
        for f in Path(model_dir).iterdir():
            if f.name != name:
                (folder / f.name).symlink_to(f)
        with pytest.raises(FileNotFoundError, match=f"lacks {name}.*modelscope download --model {M.MODEL_ID}"):
            M.load_mplug(folder)


def test_loading_is_strict_but_allows_the_documented_unused_keys(tmp_path, model_dir):
    model, _ = M.load_mplug(model_dir)          # wrapped in {'module': ...}, with every kind of unused key
    assert model.image_res == 32 and model.bert.fusion_start == 3 and model.generation == M.Generation(5, 1, 10)
    base = tiny()
    cases = {"missing": lambda sd: sd.pop("fusion_encoder.encoder.layer.4.crossattention.self.key.weight"),
             "unexpected": lambda sd: sd.__setitem__("text_encoder.encoder.layer.7.output.dense.weight", torch.zeros(1)),
             "shape": lambda sd: sd.__setitem__("visn_fc.bias", torch.zeros(65))}
    for what, change in cases.items():
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        change(sd)
        folder = write(base, tmp_path / what)
        torch.save(sd, folder / "pytorch_model.bin")
        with pytest.raises(ValueError, match={"missing": r"missing 1 key\(s\).*layer\.4\.crossattention",
                                              "unexpected": r"unexpected 1 key\(s\).*layer\.7",
                                              "shape": r"visn_fc\.bias \(65,\) != \(64,\)"}[what]):
            M.load_mplug(folder)
    # a 'model.' prefix is stripped (modelscope removes every 'model.'), {'model': sd} unwrapped
    folder = write(base, tmp_path / "prefixed")
    torch.save({"model": {"model." + k: v for k, v in base.state_dict().items()}}, folder / "pytorch_model.bin")
    M.load_mplug(folder)


def test_image_res_and_stride_come_from_the_files(tmp_path):
    folder = write(tiny(), tmp_path / "m")
    text = (folder / "config.yaml").read_text().replace("image_res: 32", "image_res: 48")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match="image_res 48 but the checkpoint's positional table .*5 rows.* 32 px"):
        M.load_mplug(folder)
    assert [M.BertDims.from_dict({**BERT, "stride_layer": s}).connected(k) for s in (2, 3, 100) for k in range(3)] == \
        [False, False, True, False, False, False, False, False, False]


def test_pickles_with_objects_are_refused(tmp_path):
    folder = write(tiny(), tmp_path / "m")
    torch.save({"model": tiny().state_dict(), "args": object()}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        M.load_mplug(folder)


# --- preprocessing and text ----------------------------------------------------------------------------------

def test_preprocessing_follows_the_official_rule():
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 255, (30, 50, 4), dtype=np.uint8), "RGBA")
    x = M.preprocess(rgba, 32)
    # the documented rule by hand: convert('RGB') drops alpha, PIL bicubic to (res, res), /255, CLIP mean/std
    rgb = np.asarray(rgba.convert("RGB").resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    want = (rgb - np.array(M.MEAN, dtype=np.float32)) / np.array(M.STD, dtype=np.float32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), want, rtol=0, atol=1e-6)


def test_questions_are_lowercased_padded_and_truncated_to_25(judge):
    ids, mask = judge.tokenizer.questions(QUESTIONS)
    assert ids.shape == (len(QUESTIONS), 25) and torch.equal(ids[0], ids[0])
    a, _ = judge.tokenizer.questions(["is there a blue cats?"])
    assert torch.equal(ids[2], a[0])                                    # lower-cased
    assert ids[2, :9].tolist() == [101] + [VOCAB.index(w) for w in "is there a blue cat ##s ?".split()] + [102]
    assert mask[2].sum() == 9 and ids[2, 9:].eq(0).all()
    assert mask[5].all() and ids[5, -1] == 102                          # 23 wordpieces + [CLS] + [SEP]
    assert judge.tokenizer.decode([101, YES, 102]) == "yes"
    assert judge.tokenizer.decode([101, VOCAB.index("cat"), VOCAB.index("##s"), VOCAB.index("?"), 102]) == "cats?"


# --- the beam search --------------------------------------------------------------------------------------------

def biased(seed, bias: dict[int, float], gen=M.Generation(5, 1, 10), std=0.5):
    model = tiny(seed, std, gen)
    with torch.no_grad():
        for token, value in bias.items():
            model.text_decoder.cls.predictions.bias[token] += value
    return model


@pytest.fixture(scope="module")
def judges(judge):
    """A dozen settings: long answers (random), forced yes / no, early [SEP], min_length > 1, beam 3, short max."""
    out = [judge]
    for seed, bias, gen in [(1, {}, M.Generation(5, 1, 10)), (2, {YES: 40.0, M.END_ID: 80.0}, M.Generation(5, 1, 10)),
                            (3, {NO: 40.0, M.END_ID: 80.0}, M.Generation(5, 1, 10)),
                            (4, {M.END_ID: 2.5}, M.Generation(5, 1, 10)), (5, {M.END_ID: 3.0}, M.Generation(5, 3, 10)),
                            (6, {YES: 3.0, M.END_ID: 2.0}, M.Generation(3, 1, 6)), (7, {}, M.Generation(4, 1, 4))]:
        out.append(M.MPlugJudge(biased(seed, bias, gen), judge.tokenizer))
    return out


def test_batched_search_equals_the_official_per_question_search(judges):
    """exact mode: bit-equal answers and scores; batched modes: equal answers, scores within float rounding."""
    ims = images(2)
    qs = [QUESTIONS[:4], QUESTIONS[3:]]
    kinds, lengths, worst = set(), set(), {}
    modes = ({}, {"exact": False, "kv_cache": True}, {"kv_cache": True}, {"exact": False, "chunk": 3})
    for n, j in enumerate(judges):
        ref = [[j.reference_answer(im, q) for q in q_list] for im, q_list in zip(ims, qs)]
        for mode in modes[:2] if n % 2 else modes:
            got = j.answer_many(ims, qs, **mode)
            for row, ref_row in zip(got, ref):
                for a, r in zip(row, ref_row):
                    assert a.ids == r.ids and a.text == r.text, (mode, a, r)
                    if not mode:
                        assert a.score == r.score
                    worst[str(mode)] = max(worst.get(str(mode), 0.0), abs(a.score - r.score))
        for row in ref:
            for r in row:
                kinds.add(r.text if r.text in ("yes", "no") else "other")
                lengths.add(len(r.ids))
    assert kinds == {"yes", "no", "other"} and max(lengths) == 11 and min(lengths) <= 3, (kinds, lengths)
    assert max(worst.values()) < 1e-4, worst


def test_beam_search_rules_on_a_scripted_decoder():
    """min_length blocks [SEP], the length penalty divides, a question stops when beam 0 ends, the best stored
    hypothesis wins even when it came from a lower beam earlier."""
    vocab = 110
    gen = M.Generation(beam_size=2, min_length=1, max_length=5)

    def logits_for(seq):
        out = torch.full((seq.shape[0], vocab), -10.0)
        for r, s in enumerate(seq.tolist()):
            if len(s) == 1:
                out[r, 105], out[r, 106], out[r, M.END_ID] = 2.0, 1.0, 5.0      # [SEP] best, but blocked
            elif s[-1] == 105:
                out[r, M.END_ID], out[r, 107] = 0.0, 0.1                         # beam 0 goes on; [SEP] second
            elif s[-1] == 106:
                out[r, M.END_ID] = 3.0
            else:
                out[r, M.END_ID] = 3.0
        return out

    [(ids, score)] = M.beam_search(1, logits_for, lambda index: None, gen, "cpu")
    assert ids[1] != M.END_ID                                            # min_length 1
    # step 1 hypotheses: 105->107 (alive) and 106->[SEP] / 105->[SEP] finished; best score is kept
    lp = torch.log(torch.softmax(torch.tensor([-10.0] * 105 + [2.0, 1.0] + [-10.0] * 3), 0))
    assert len(ids) <= 4 and ids[-1] == M.END_ID
    assert score < 0 and np.isfinite(score) and lp.numel() == vocab


# --- parity with modelscope (a separate venv; skipped without it) ----------------------------------------------

@pytest.mark.worker_env
@pytest.mark.skipif(not MODELSCOPE_PY.is_file(), reason="the dpg-official env is not built: run "
                    "`harness env build dpg-official` (modelscope 1.40.2, recipe B of ../shared/docs/dpg_vqa.md)")
def test_answers_equal_modelscope(tmp_path, request):
    from worker_env import asked_for
    if not asked_for(request.config):
        pytest.skip("parity test in the dpg-official env: run with -m worker_env (CI's worker-env step does)")
    script = Path(__file__).with_name("mplug_oracle.py")
    folder = tmp_path / "ms"
    folder.mkdir()
    (folder / "config_bert.json").write_text(json.dumps(BERT))
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB))
    ims = images(3, seed=5)
    for i, im in enumerate(ims):
        im.save(folder / f"im{i}.png")
    (folder / "questions.json").write_text(json.dumps(QUESTIONS))
    proc = subprocess.run([str(MODELSCOPE_PY), str(script), str(folder)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    oracle = json.loads((folder / "oracle.json").read_text())
    n = 0
    for case in oracle:
        j = M.MPlugJudge(*M.load_mplug(folder / case["dir"]))
        got = j.answer_many([Image.open(folder / f"im{i}.png") for i in range(len(ims))], [QUESTIONS] * len(ims))
        for i, row in enumerate(got):
            for q, a in zip(QUESTIONS, row):
                want = case["answers"][i][QUESTIONS.index(q)]
                assert a.ids == want["ids"] and a.text == want["text"] and a.score == want["score"], (case["dir"], q)
                n += 1
    assert n >= 12


# --- the dpg evaluator end to end ---------------------------------------------------------------------------------

CSV_HEADER = "item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language\n"


def test_dpg_suite_end_to_end_resumes_from_the_answer_cache(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from harness.backbones.tiny import load_tiny
    from harness.cli import app
    from harness.store import ResultsStore
    model = biased(2, {YES: 40.0, M.END_ID: 80.0})
    folder = write(model, tmp_path / "judge")
    data = tmp_path / "data"
    (data / "dpg" / "prompts").mkdir(parents=True)
    (data / "dpg" / "prompts" / "p1.txt").write_text("a red circle")
    (data / "dpg" / "prompts" / "p2.txt").write_text("two blue squares")
    rows = ["skipped,,,1,0,,,entity - whole (cat),is there a cat?",          # the official skips this data row
            "p1,,,1,0,,,entity - whole (cat),is there a cat?",
            "p1,,,2,1,,,attribute - color (cat red),is the cat red?",
            "p2,,,1,0,,,entity - whole (dog),is there a dog?",
            "p2,,,2,1,,,other - count (dog 2),are there two dogs?",
            "p2,,,3,0,,,global - (blue),is it blue?"]
    (data / "dpg" / "dpg_bench.csv").write_text(CSV_HEADER + "\n".join(rows) + "\n")
    suite = tmp_path / "t-dpg-judge.yaml"
    suite.write_text("name: dpg-tiny\nversion: 1\nbackbones: [tiny]\nprompts: {kind: dpg-prompts, dir: dpg/prompts}\n"
                     "images_per_prompt: 4\nseed: 3\nsampler: {steps: 2, cfg: 1.0}\nevaluators: [dpg]\nlayout: dpg\n")
    ckpt = tmp_path / "ckpt" / "model.safetensors"
    ckpt.parent.mkdir()
    load_tiny("", d_model=32, n_layers=1, n_heads=2, mlp_hidden=64).save(ckpt)
    monkeypatch.setenv("HARNESS_DATA", str(data))
    monkeypatch.setenv(M.DIR_ENV, str(folder))
    monkeypatch.setenv("HARNESS_DPG_ANSWERS", str(tmp_path / "answers.sqlite"))
    store = tmp_path / "store.sqlite"
    args = ["eval", "--suite", str(suite), "--checkpoint", str(ckpt), "--store", str(store),
            "--out", str(tmp_path / "images"), "--batch-size", "4"]
    from evaluators import dpg_judge
    calls = []
    real = M.MPlugJudge.answer_many

    def counted(self, ims, qs, **kw):
        calls.append(sum(map(len, qs)))
        return real(self, ims, qs, **kw)
    monkeypatch.setattr(M.MPlugJudge, "answer_many", counted)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sum(calls) == 4 * 2 + 4 * 3       # every tile's questions asked once: p1 has 2, p2 has 3
    with ResultsStore(store) as s:
        frame = s.latest_metrics("dpg-tiny")
        metrics = dict(zip(frame["name"], frame["value"]))
        records = s.records_for(int(frame["evaluation_id"].iloc[0]), "dpg")
    assert len(records) == 8 and {r["tile"] for r in records.values()} == {0, 1, 2, 3}
    assert all(r["score"] == (1.0 if all(r["yes"].values()) else r["score"]) for r in records.values())
    assert 0 <= metrics["dpg_overall"] <= 100 and {"dpg_entity", "dpg_attribute", "dpg_other", "dpg_global"} <= set(metrics)
    # a fresh store (as after a kill before any record was stored): every answer comes from the cache
    calls.clear()
    dpg_judge._JUDGES.clear()
    again = CliRunner().invoke(app, args[:5] + ["--store", str(tmp_path / "store2.sqlite")] + args[7:])
    assert again.exit_code == 0, again.output
    assert calls == []
    with ResultsStore(tmp_path / "store2.sqlite") as s:
        frame = s.latest_metrics("dpg-tiny")
        assert dict(zip(frame["name"], frame["value"]))["dpg_overall"] == metrics["dpg_overall"]
    board = CliRunner().invoke(app, ["leaderboard", "--store", str(store), "--out", str(tmp_path / "lb.md")])
    assert board.exit_code == 0, board.output
    text = (tmp_path / "lb.md").read_text()
    assert "DPG-Bench" in text and f"{metrics['dpg_overall']:.2f}" in text
