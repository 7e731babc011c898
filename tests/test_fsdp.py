"""distributed.strategy: fsdp (FSDP2 fully_shard, full fine-tuning) at two processes (torchrun, gloo, CPU) equals
one process, and its checkpoints (full tensors, the one-process format) resume at any world size.

How close (the same bounds as tests/test_distributed.py for ddp): rollout codes and reward-derived numbers exactly
equal; losses, ratios, KL, grad norm within 1e-5 relative / 1e-6 absolute; weights after K updates within 1e-6.
The tiny backbone has 2 blocks here, so each block and the root are separate FSDP units; beta_kl > 0, so the frozen
KL reference is sharded too. An MMaDA replica (the LLaDA transformer of the 8B backbones) is sharded the same way:
forward, gradients, ML-Cache methods and its full-fine-tuning checkpoint. Four torchrun launches of ~5-10 s each
on 2 cores (~50 s in all).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import (BIN, CONFIG, WTOL, assert_line_equal, max_weight_diff, torchrun,  # noqa: E402
                              write_config)

FSDP = {"distributed": {"strategy": "fsdp"},
        "backbone": {**CONFIG["backbone"], "options": {"d_model": 32, "n_layers": 2, "n_heads": 2}}}


def first_rows_only(views):
    """A method's views, but the first inner iteration trains rollouts 0-3 only: rank 1 (rollouts 8-15) then has no
    token in the loss and rank 0's micro-batch [6, 8) none, yet every rank must run every sharded forward."""
    def changed(cfg, trace, k, gen):
        out = views(cfg, trace, k, gen)
        if k > 0:
            return out
        rows = torch.arange(trace.codes.shape[0])[:, None] < 4
        return [dataclasses.replace(v, in_loss=v.in_loss & rows) for v in out]
    return changed


def worker(config: str, out: str, steps: int) -> None:
    """train_step under torchrun (or in this process): the step's rollout codes, log lines, full weights."""
    from harness import distributed
    from harness.config import load_config
    from trainers.config import TrainConfig
    from trainers.loop import build_trainer, train_step
    torch.set_num_threads(1)
    with distributed.session():
        tr = build_trainer(load_config(TrainConfig, config, []))
        tr.method = dataclasses.replace(tr.method, views=first_rows_only(tr.method.views))
        lines, codes = [], []
        for step in range(steps):
            lines.append(train_step(tr, step))
            codes.append(tr.last_codes.cpu())
        module = tr.backbone.module
        weights = distributed.full_state_dict(module) if tr.strategy == "fsdp" else module.state_dict()
        if distributed.is_main():
            torch.save({"lines": lines, "codes": codes, "weights": weights, "strategy": tr.strategy,
                        "sharded": type(module).__name__, "world": distributed.world_size()}, out)


def test_fsdp_two_processes_equals_one(tmp_path):
    # grad_clip below the gradient norms (~0.8): clipping scales the sharded gradients by the global norm
    config = write_config(tmp_path / "cfg.yaml", **FSDP, optim={"grad_clip": 0.1})
    worker(str(config), str(tmp_path / "one.pt"), 2)
    torchrun(sys.executable, __file__, "worker", config, tmp_path / "two.pt", 2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world"], one["strategy"]) == (1, "single") and (two["world"], two["strategy"]) == (2, "fsdp")
    assert two["sharded"].startswith("FSDP")             # fully_shard swapped the module's class in place
    for a, b in zip(one["codes"], two["codes"]):
        assert torch.equal(a, b)
    for a, b in zip(one["lines"], two["lines"]):
        assert_line_equal(a, b)
    assert all(line["grad_norm"] > 0.1 for line in one["lines"])   # so clipping was active
    assert one["weights"].keys() == two["weights"].keys()
    for k in one["weights"]:
        assert torch.allclose(one["weights"][k], two["weights"][k], rtol=0, atol=WTOL), k


def lines_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_checkpoints_resume_across_world_sizes(tmp_path):
    from harness.config import load_config
    from harness.runs import RunDir
    from trainers.config import TrainConfig
    from trainers.loop import cli_train, read_trainer_state, train
    # with an EMA: the saved weights are the average, the live weights travel in trainer_state.pt
    config = write_config(tmp_path / "cfg.yaml", **FSDP, optim={"ema_decay": 0.5})
    train(load_config(TrainConfig, str(config), []), tmp_path / "one", log=lambda *a: None)
    out = torchrun(BIN / "harness", "train", "--config", config, "--run-dir", tmp_path / "two")
    assert "2 processes, strategy fsdp" in out.stdout
    one, two = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    assert len(lines_of(one.path)) == len(lines_of(two.path)) == 3
    for a, b in zip(lines_of(one.path), lines_of(two.path)):
        assert_line_equal(a, b)
    for c1, c2 in zip(one.checkpoints(), two.checkpoints()):
        assert c1.step == c2.step and c2.weights.name == "model.safetensors"
        assert max_weight_diff(c1.weights, c2.weights) <= WTOL
    state = read_trainer_state(two.checkpoints()[-1].trainer_state)
    assert (state["world_size"], state["strategy"]) == (2, "fsdp")
    assert not list(two.checkpoints_dir.glob(".tmp_*"))
    # the optimizer state is torch.optim's own layout with full tensors, as one process writes it; so are the
    # live weights beside the EMA average
    single = read_trainer_state(one.checkpoints()[-1].trainer_state)
    assert state["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()
    for i, s in single["optimizer"]["state"].items():
        for key, t in s.items():
            assert torch.allclose(state["optimizer"]["state"][i][key], t, rtol=1e-4, atol=1e-8), (i, key)
    assert state["live_weights"].keys() == single["live_weights"].keys()
    for n, t in single["live_weights"].items():
        assert torch.allclose(state["live_weights"][n], t, rtol=0, atol=WTOL), n

    # 2 -> 1: resume the 2-process run in one process from step 2; step 3 is the uninterrupted run's
    back = tmp_path / "two_to_one"
    shutil.copytree(two.path, back)
    shutil.rmtree(RunDir(back).checkpoint_path(3))
    cli_train(resume=str(back), log=lambda *a: None)
    assert_line_equal(lines_of(one.path)[2], lines_of(back)[2])
    assert max_weight_diff(one.checkpoint_path(3) / "model.safetensors",
                           RunDir(back).checkpoint_path(3) / "model.safetensors") <= WTOL
    # 1 -> 2: resume the one-process run under fsdp at 2 processes from step 2
    up = tmp_path / "one_to_two"
    shutil.copytree(one.path, up)
    shutil.rmtree(RunDir(up).checkpoint_path(3))
    torchrun(BIN / "harness", "train", "--resume", up)
    assert_line_equal(lines_of(one.path)[2], lines_of(up)[2])
    assert max_weight_diff(one.checkpoint_path(3) / "model.safetensors",
                           RunDir(up).checkpoint_path(3) / "model.safetensors") <= WTOL
    assert read_trainer_state(RunDir(up).checkpoint_path(3) / "trainer_state.pt")["world_size"] == 2


def replica_trainer(replica: str):
    """A Trainer around an MMaDA replica (LLaDA transformer) for full fine-tuning, sharded under torchrun: what
    save_checkpoint and load_checkpoint use (no method, reward or sampler; train_step needs real scorers)."""
    from harness import distributed
    from harness.backbones.mmada import load_mmada
    from trainers.config import TrainConfig
    from trainers.loop import Trainer
    cfg = TrainConfig.model_validate({"backbone": {"name": "mmada", "checkpoint": replica, "dtype": "float32",
                                                   "options": {"resolution": 64}}})
    bb = load_mmada(replica, dtype="float32", resolution=64)
    bb.module.gradient_checkpointing = True   # blocks recomputed in backward, inside their FSDP units
    strategy = "single"
    if distributed.active():
        distributed.wrap_fsdp(bb.module)
        strategy = "fsdp"
    optimizer = torch.optim.AdamW(bb.module.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    return Trainer(cfg, bb, None, None, optimizer, scheduler, None, None, strategy=strategy)


def llada_worker(replica: str, out: str, run_dir: str) -> None:
    """The replica trainer under torchrun (or in this process): logits, the summed gradient of a loss over this
    rank's half of a batch (divided by the global count), ML-Cache logits (methods other than forward, registered
    with FSDP), then one AdamW update and its checkpoint (rank 0 writes it from the gathered full tensors)."""
    from harness import distributed
    from trainers.loop import gather_full_state, save_checkpoint
    torch.set_num_threads(1)
    with distributed.session():
        tr = replica_trainer(replica)
        bb = tr.backbone
        prompts = bb.tokenize(["a red cube", "two blue balls", "a green cone on a box", "one cat"])
        codes = torch.randint(0, bb.CODEBOOK_SIZE, (4, 16), generator=torch.Generator().manual_seed(0))
        codes[:, ::3] = -1
        lo, hi = distributed.share(4)
        mine = prompts.select(range(lo, hi))
        logits = bb.image_logits(mine, codes[lo:hi])
        (logits.logsumexp(-1).sum() / (4 * 16)).backward()
        grads = {n: distributed.full_tensor(p.grad).clone() for n, p in bb.module.named_parameters()}
        with torch.no_grad():
            refresh, state = bb.image_logits_ml_cache(mine, codes[lo:hi], None, compute_ratio=0.5)
            cached, _ = bb.image_logits_ml_cache(mine, codes[lo:hi].clamp(min=0), state, compute_ratio=0.5)
        tr.optimizer.step()
        full = gather_full_state(tr)
        distributed.on_main(lambda: save_checkpoint(tr, Path(run_dir), 1, full=full))
        gathered = [distributed.gather_tensors(t.detach()) for t in (logits, refresh, cached)]
        if distributed.is_main():
            torch.save({"logits": gathered, "grads": grads}, out)


def test_fsdp_shards_a_llada_replica_like_one_process(tmp_path):
    from harness.backbones.replicas import make_mmada_replica
    from harness.checkpoint import load_weights
    from harness.runs import RunDir
    from trainers.loop import load_checkpoint, read_trainer_state
    replica = str(make_mmada_replica(tmp_path / "mmada", seed=1, d_model=16, n_layers=2))
    llada_worker(replica, str(tmp_path / "one.pt"), str(tmp_path / "run1"))
    torchrun(sys.executable, __file__, "llada", replica, tmp_path / "two.pt", tmp_path / "run2")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for a, b in zip(one["logits"], two["logits"]):   # forward, ML-Cache refresh, ML-Cache step
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert one["grads"].keys() == two["grads"].keys()
    for n, g in one["grads"].items():
        assert torch.allclose(g, two["grads"][n], rtol=1e-5, atol=1e-7), n
    # the checkpoints: the adapter-file format full fine-tuning of a LLaDA backbone writes, every weight in it
    c1, c2 = RunDir(tmp_path / "run1").checkpoint_path(1), RunDir(tmp_path / "run2").checkpoint_path(1)
    (w1, m1), (w2, m2) = load_weights(c1 / "adapter.safetensors"), load_weights(c2 / "adapter.safetensors")
    assert m1.keys() == m2.keys() and w1.keys() == w2.keys() and len(w1) == len(one["grads"])
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= WTOL
    # the 2-process checkpoint resumes in one process: weights and optimizer state as the one-process run has them
    tr = replica_trainer(replica)
    assert load_checkpoint(tr, c2) == 1
    assert max(float((w1[n] - p.detach()).abs().max()) for n, p in tr.backbone.module.named_parameters()) <= WTOL
    s1 = read_trainer_state(c1 / "trainer_state.pt")["optimizer"]["state"]
    loaded = tr.optimizer.state_dict()["state"]
    assert s1.keys() == loaded.keys()
    for i in s1:
        for key in s1[i]:
            assert torch.allclose(s1[i][key], loaded[i][key], rtol=1e-4, atol=1e-9), (i, key)


def test_fsdp_with_lora_is_a_clear_error():
    from trainers.config import TrainConfig
    from trainers.loop import check_train_config
    cfg = TrainConfig.model_validate({**CONFIG, **FSDP, "backbone": {**FSDP["backbone"], "lora": {"r": 4}}})
    with pytest.raises(ValueError, match="fsdp shards full fine-tuning only; with backbone.lora use ddp"):
        check_train_config(cfg, for_training=False)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
if __name__ == "__main__" and sys.argv[1:2] == ["llada"]:
    llada_worker(sys.argv[2], sys.argv[3], sys.argv[4])
