"""The method comparison on the tiny default: every method x seed at equal compute, run in parallel
processes, each final checkpoint scored on the shapes-geneval and shapes-quality suites through the one
evaluation path (evaluators.run.evaluate_checkpoints, the protocol `harness eval` uses). Writes one JSON per
run and a summary under --out; each run's folder holds its store and images.

    python benchmarks/compare_methods.py --out runs/compare --steps 60 --seeds 0 1 2 --device cpu --procs 2

Equal compute: every method draws the same rollouts (prompts_per_step x group_size per step, same
steps) and makes the same number of optimizer updates (inner_iterations per step); forward passes
per update differ (tracegrpo replays trace_groups passes) and are reported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import shutil
import time
import traceback
from pathlib import Path

METHODS = ["ht-grpo", "grpo", "maskgrpo", "tracegrpo", "diffu-grpo"]


EVAL_SUITES = ["shapes-geneval", "shapes-quality"]   # the suites' own protocol, as `harness eval` scores them


def eval_checkpoint(source, out: Path, backbone=None, checkpoint_hash: str | None = None, device: str = "cpu") -> dict:
    """Every metric of EVAL_SUITES on one checkpoint, through the one evaluation path (evaluate_checkpoints),
    into a store of its own under `out` (jobs run in parallel processes). backbone: the model already holding
    the checkpoint's weights."""
    from evaluators.run import evaluate_checkpoints
    from harness.store import ResultsStore
    with ResultsStore(out / "store.sqlite") as store:
        scores = evaluate_checkpoints(source, EVAL_SUITES, store, loaded=backbone, checkpoint_hash=checkpoint_hash,
                                      out_root=out / "images", batch_size=256, device=device)
    return {k: v for s in scores for k, v in s.metrics.items()}


def run_one(job: dict) -> dict:
    import torch
    torch.set_num_threads(job["threads"])
    from harness.config import dump_config
    from harness.io import atomic_write_text
    from harness.runs import RunDir
    from trainers.config import TrainConfig
    from trainers.loop import build_trainer, save_checkpoint, train_step
    label = job.get("label", job["method"])
    out_path = Path(job["out"]) / f"{label}_seed{job['seed']}.json"
    try:
        overrides = dict(job.get("method_options", {}))
        # a variant may also set lr, beta, reward ({evaluator: weight}), method_name, tag_weights, sampler, dtype,
        # optim ({...}) or loss ({...}) besides method options
        lr, beta = overrides.pop("lr", job["lr"]), overrides.pop("beta", job["beta"])
        reward = overrides.pop("reward", {"shapes-geneval": 1.0})
        method_name = overrides.pop("method_name", job["method"])
        rollout = {"prompts_per_step": job["prompts"], "group_size": job["group"], "dtype": job["rollout_dtype"],
                   **({"tag_weights": job["tag_weights"]} if job.get("tag_weights") else {})}
        for key in ("tag_weights", "sampler", "dtype"):
            if key in overrides:
                rollout[key] = overrides.pop(key)
        optim = {"lr": lr, **overrides.pop("optim", {})}
        loss = {"beta_kl": beta, **overrides.pop("loss", {})}
        cfg = TrainConfig(name=f"{label}_seed{job['seed']}", seed=job["seed"], steps=job["steps"],
                          backbone={"device": job["device"]}, method={"name": method_name, **overrides},
                          rollout=rollout, optim=optim, loss=loss, reward=reward, checkpoint={"eval_suite": None},
                          tensorboard=False)
        tr = build_trainer(cfg)
        log, t0 = [], time.time()
        for step in range(cfg.steps):
            log.append(train_step(tr, step))
            if job["max_seconds"] and time.time() - t0 > job["max_seconds"]:
                break
        train_s = time.time() - t0
        run = RunDir(Path(job["out"]) / cfg.name)
        atomic_write_text(run.config_path, dump_config(cfg))
        ckpt = save_checkpoint(tr, run.path, len(log))   # the EMA weights when optim.ema_decay > 0
        with tr.averaged_weights():
            scores = eval_checkpoint(ckpt, run.path, tr.backbone)
        result = {"method": job["method"], "label": label, "seed": job["seed"], "steps_done": len(log), "steps_planned": cfg.steps,
                  "train_seconds": train_s, "config": cfg.model_dump(mode="json"), "curve": log, "eval": scores}
        if tr.ema is not None:   # the same run's live weights (not saved), for a paired comparison
            live = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in tr.trainable().values()))
            result["eval_live"] = eval_checkpoint(ckpt, run.path, tr.backbone, checkpoint_hash=live.hexdigest())
        if not job.get("save_checkpoint"):
            shutil.rmtree(ckpt)
    except Exception:
        result = {"method": job["method"], "label": label, "seed": job["seed"], "error": traceback.format_exc()}
    out_path.write_text(json.dumps(result))
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--tag-weights", default="{}", help="JSON {tag: weight} for the train prompts (default: uniform)")
    p.add_argument("--rollout-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=0)
    p.add_argument("--base", action="store_true", help="also score the untrained base")
    p.add_argument("--variants", default="{}", help='JSON {label: {method options}} extra ht-grpo variants')
    p.add_argument("--render", metavar="PNG", help="do not train: print the tables of --out and draw its curves to PNG")
    a = p.parse_args()
    if a.render:
        print(render_markdown(a.out))
        render_curves(a.out, a.render)
        return
    Path(a.out).mkdir(parents=True, exist_ok=True)
    common = dict(out=a.out, steps=a.steps, prompts=a.prompts, group=a.group, lr=a.lr, beta=a.beta, device=a.device,
                  threads=a.threads, max_seconds=a.max_seconds, tag_weights=json.loads(a.tag_weights),
                  rollout_dtype=a.rollout_dtype)
    jobs = [dict(common, method=m, seed=s) for m in a.methods for s in a.seeds]
    for label, opts in json.loads(a.variants).items():
        jobs += [dict(common, method="ht-grpo", seed=s, method_options=opts, label=label) for s in a.seeds]
    t0 = time.time()
    if a.base:
        import torch
        from harness.backbones.tiny import DEFAULT_CHECKPOINT
        torch.set_num_threads(a.threads)
        base = eval_checkpoint(DEFAULT_CHECKPOINT, Path(a.out) / "base", device=a.device)
        (Path(a.out) / "base.json").write_text(json.dumps({"method": "base", "eval": base}))
    with mp.get_context("spawn").Pool(a.procs) as pool:
        results = pool.map(run_one, jobs, chunksize=1)
    summary = [{k: v for k, v in r.items() if k not in ("curve", "config")} for r in results]
    (Path(a.out) / "summary.json").write_text(json.dumps({"seconds": time.time() - t0, "args": vars(a), "runs": summary}, indent=1))
    for r in summary:
        print(r.get("label"), r.get("seed"), r.get("steps_done"), {k: round(v, 3) for k, v in r.get("eval", {}).items()
                                                                     if k in ("geneval_overall", "position_spread", "free_color_entropy")},
              r.get("error", "")[-300:])



def render_curves(result_dir: str | Path, out_png: str | Path) -> None:
    """Training curves of a comparison, one line per method (each step's metrics averaged over seeds),
    drawn by the HTML report's plotter."""
    import base64
    import glob
    import numpy as np
    from leaderboards.report import CURVE_KEYS, training_curves_png
    per_label: dict[str, list[list[dict]]] = {}
    for f in sorted(glob.glob(str(Path(result_dir) / "*.json"))):
        r = json.loads(Path(f).read_text())
        if r.get("curve"):
            per_label.setdefault(r.get("label", r["method"]), []).append(r["curve"])
    runs = {}
    for label, curves in per_label.items():
        n = min(len(c) for c in curves)
        runs[f"{label} (mean of {len(curves)})"] = [
            {"step": i + 1, **{k: float(np.mean([c[i][k] for c in curves])) for k in CURVE_KEYS if k in curves[0][i]}}
            for i in range(n)]
    png = training_curves_png(runs)
    if png is None:
        raise ValueError(f"no training curves in {result_dir}")
    Path(out_png).write_bytes(base64.b64decode(png))


def render_markdown(result_dir: str | Path) -> str:
    """Per-tag table (mean ± std over seeds) and quality / diversity table from a comparison's JSON files."""
    import glob
    import numpy as np
    rows: dict[str, list[dict]] = {}
    steps: dict[str, list[int]] = {}
    for f in sorted(glob.glob(str(Path(result_dir) / "*.json"))):
        r = json.loads(Path(f).read_text())
        if "eval" not in r:
            continue
        label = r.get("label", r["method"])
        rows.setdefault(label, []).append(r["eval"])
        steps.setdefault(label, []).append(r.get("steps_done") or 0)

    def cell(vals, digits=2):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        return f"{np.mean(vals):.{digits}f}" + (f" ± {np.std(vals, ddof=1):.{digits}f}" if len(vals) > 1 else "")

    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    out = ["| Method | Seeds | Steps done | Single Obj. | Two Obj. | Counting | Colors | Position | Color Attri. | Overall |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = ["base"] + [m for m in METHODS if m in rows] + sorted(k for k in rows if k not in METHODS and k != "base")
    for label in order:
        evs = rows[label]
        st = steps[label]
        out.append(f"| {label} | {len(evs) if label != 'base' else '–'} | {'–' if label == 'base' else f'{min(st)}-{max(st)}'} | "
                   + " | ".join(cell([e.get(f'geneval_{t}') for e in evs]) for t in tags)
                   + f" | **{cell([e.get('geneval_overall') for e in evs])}** |")
    q = ["stray_cell_fraction", "shape_fidelity", "background_cleanliness", "position_spread", "size_spread", "free_color_entropy"]
    out += ["", "| Method | " + " | ".join(q) + " |", "|---|" + "---:|" * len(q)]
    for label in order:
        out.append(f"| {label} | " + " | ".join(cell([e.get(k) for e in rows[label]], 3) for k in q) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
