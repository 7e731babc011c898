"""Run a suite on a checkpoint: generate images in the official layouts, cache them, score them, store results.

Folder of one (checkpoint, suite version):  <out_root>/<suite>/<checkpoint-hash[:12]>-v<version>/
  layout "geneval" (GenEval's own layout, readable by its evaluate_images.py):
      00000/metadata.jsonl        the prompt's metadata line; folder number = prompt index in the suite
      00000/samples/0000.png ...  its images
      protocol.json               what the images were drawn with (checked on every re-run)
      results.jsonl               GenEval results records of the suite's GenEval-format evaluator
  layout "dpg" (DPG-Bench's layout: every file of the image folder is a grid):
      grids/<prompt_id>.png       4 images as a 2x2 grid (top-left, top-right, bottom-left, bottom-right)
      protocol.json
The DPG grids sit in grids/ because DPG-Bench reads every file of its folder as an image.

Caching and resuming: an image is drawn only when its file is missing, so the cache key is
(checkpoint hash, suite version) in the folder name, the prompt in the file path, and the seed and sampler
in protocol.json -- a re-run with another seed or sampler under the same version is refused, not mixed.
Scores go to the results store as they are made; an interrupted run resumes the store's unfinished
evaluation and scores only images without a record, and a finished evaluation is returned as is.

Image j of prompt i has global sample index i * stride + j (stride: see evaluators/suites.py), so every
image depends only on (checkpoint, prompt, seed, index), never on the batch it was drawn in.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from evaluators.base import Evaluator, Sample
from evaluators.suites import (Suite, SuitePrompt, index_stride, load_suite, prompts_digest, sampler_for,
                               suite_prompts, suites_for_backbone)
from harness import distributed, provenance, registry, sampling
from harness.samples import images_from_codes
from harness.io import atomic_write_bytes, atomic_write_json, atomic_write_text, confined, sha256_file

__all__ = ["evaluate_checkpoints", "evaluate", "evaluate_images_dir", "suites_for_backbone", "run_dir", "weights_hash", "resolve_evaluators"]

# progress(stage, done, total) with stage "generate" or "score"
Progress = Callable[[str, int, int], None]
GENEVAL_RESULT_FIELDS = {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_SAMPLE_NAME = re.compile(r"^\d+\.png$")   # GenEval scores only files named like this


@dataclass
class ImageRef:
    """One image to score: a GenEval sample file, or one tile of a DPG grid."""
    key: str              # "00012/samples/0003.png" (GenEval), "<prompt_id>/2" (DPG tile 2)
    path: Path
    metadata: dict
    prompt_index: int
    tile: int | None = None
    tile_size: int | None = None   # DPG: side of a tile (the official --resolution); None: half the grid


# --- public API ------------------------------------------------------------------------------------------------

def run_dir(out_root: str | os.PathLike, suite: Suite, checkpoint_hash: str, seed_override: int | None = None) -> Path:
    """The image folder; a seed that overrides the suite's adds "-s<seed>" (a separate cache)."""
    extra = f"-s{seed_override}" if seed_override is not None else ""
    return Path(out_root) / suite.name / f"{checkpoint_hash[:12]}-v{suite.version}{extra}"


IMAGE_FIELDS = ("prompts", "images_per_prompt", "min_images_per_tag", "seed", "sampler", "resolution", "layout")


def image_source(suite: Suite, seed_override: int | None = None) -> Suite:
    """The suite whose image folder `suite` uses: itself, or its `images_from` when everything that decides the
    images is the same (so scoring dpg, quality and preference on one checkpoint draws the images once)."""
    if not suite.images_from:
        return suite
    source = load_suite(suite.images_from)
    if seed_override is not None:
        source = source.model_copy(update={"seed": seed_override})
    if source.images_from:
        raise ValueError(f"suite {suite.name!r} takes its images from {source.name!r}, which takes its own from "
                         f"{source.images_from!r}; point {suite.name!r} at the suite that draws them")
    differ = [f for f in IMAGE_FIELDS if getattr(source, f) != getattr(suite, f)]
    if differ:
        raise ValueError(f"suite {suite.name!r} takes its images from {source.name!r}, but their "
                         f"{', '.join(differ)} differ; make them equal or remove images_from")
    return source


def weights_hash(checkpoint_path: str | os.PathLike) -> str:
    """Identity of a checkpoint: a run checkpoint's (harness.runs.Checkpoint.identity: its weights, not the
    trainer state beside them), otherwise provenance.checkpoint_hash of the file or folder."""
    from harness.runs import checkpoint_of
    ckpt = checkpoint_of(checkpoint_path)
    return ckpt.identity() if ckpt is not None else provenance.checkpoint_hash(checkpoint_path)


def resolve_evaluators(suite: Suite) -> list[Evaluator]:
    """The suite's evaluators, or a clear error naming the one that is not available or lacks its model files."""
    out = []
    for name in suite.evaluators:
        try:
            out.append(registry.get("evaluators", name))
        except KeyError as e:
            raise KeyError(f"suite {suite.name!r} uses evaluator {name!r}, which is not available in this install "
                           f"(its backend may not be written or installed yet): {e.args[0]}") from None
        except ImportError as e:
            raise ImportError(f"suite {suite.name!r}: evaluator {name!r} could not be imported ({e}); "
                              f"install its dependencies") from e
        if out[-1].check_ready is not None:
            out[-1].check_ready()
    return out


@dataclass
class CheckpointScores:
    """One suite's metrics on one checkpoint, as evaluate_checkpoints returns them."""
    checkpoint: str            # the path the evaluation is labelled with
    step: int | None           # the training step of a run checkpoint
    suite: str
    suite_version: str
    metrics: dict[str, float]


DEFAULT_IMAGE_ROOT = Path("results/images")


def evaluate_checkpoints(source, suites, store, *, backbone: str = "tiny", out_root: str | os.PathLike | None = None,
                         batch_size: int = 32, device: str = "cpu", seed: int | None = None, loaded=None,
                         checkpoint_hash: str | None = None, progress_for: Callable[[str], Progress | None] | None = None,
                         on_scores: Callable[[CheckpointScores], None] | None = None) -> list[CheckpointScores]:
    """The one evaluation path (harness eval, harness check, scoring during training, the method comparison):
    every suite on every checkpoint `source` names, a run folder (each of its checkpoints), one run checkpoint, a
    weights file / model folder, or a list of these (harness.runs.checkpoints_in).

    Each checkpoint is loaded as harness.runs loads it (a LoRA checkpoint is its base + adapter), unless `loaded`
    gives the backbone already holding its weights (the trainer's model; one checkpoint only; checkpoint_hash may
    then name weights that are not on disk). Run checkpoints label their evaluations with the run, step, method
    and train seed of the run's config, and draw into the run's eval/ folder unless out_root is given (so
    checkpoints scored during training are not drawn again; other checkpoints: results/images). progress_for(label) gives each (suite, checkpoint)'s progress callback;
    on_scores(result) is called as each one finishes."""
    from harness.runs import Checkpoint, checkpoints_in, load_checkpoint_backbone
    suites = [s if isinstance(s, Suite) else load_suite(s) for s in (suites if isinstance(suites, (list, tuple)) else [suites])]
    targets = checkpoints_in(source)
    if loaded is not None and len(targets) != 1:
        raise ValueError(f"a loaded backbone holds one checkpoint's weights, but {len(targets)} checkpoints were given")
    if checkpoint_hash is not None and loaded is None:
        raise ValueError("checkpoint_hash names the weights of a loaded backbone; pass loaded= too")
    results = []
    for target in targets:
        ckpt = target if isinstance(target, Checkpoint) else None
        path = str(ckpt.path if ckpt else target)
        bb = loaded if loaded is not None else load_checkpoint_backbone(backbone, path, device)
        for s in suites:
            root = out_root if out_root is not None else ckpt.run.eval_images if ckpt else DEFAULT_IMAGE_ROOT
            metrics = evaluate(bb, s, checkpoint_path=path, store=store, out_root=root, batch_size=batch_size,
                               progress=progress_for(f"{s.name} {Path(path).name}") if progress_for else None,
                               checkpoint_hash=checkpoint_hash, seed=seed,
                               run=str(ckpt.run.path) if ckpt else None, step=ckpt.step if ckpt else None,
                               method=ckpt.run.method() if ckpt else None,
                               train_seed=ckpt.run.train_seed() if ckpt else None)
            results.append(CheckpointScores(path, ckpt.step if ckpt else None, s.name, s.version, metrics))
            if on_scores is not None and distributed.is_main():   # under torchrun: rank 0 reports
                on_scores(results[-1])
    return results


def evaluate(backbone, suite: Suite | str, *, checkpoint_path: str | os.PathLike, store,
             out_root: str | os.PathLike = "results/images", batch_size: int = 32, progress: Progress | bool | None = None,
             checkpoint_hash: str | None = None, run: str | None = None, step: int | None = None,
             method: str | None = None, seed: int | None = None, train_seed: int | None = None) -> dict[str, float]:
    """Generate (what is missing), score (what is unscored) and store one suite on one checkpoint.

    checkpoint_hash defaults to weights_hash(checkpoint_path); pass it when the checkpoint is not local (a hub
    id). seed overrides the suite's seed (its images get their own folder). train_seed: the training run's seed
    (recorded in the provenance; the leaderboard's replicates). progress: a callable
    (stage, done, total), True for plain lines on stderr, or None / False. run, step and method label the
    stored evaluation. Returns {metric name: value} over all the suite's evaluators.
    """
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    seed_override = int(seed) if seed is not None and seed != suite.seed else None
    if seed_override is not None:
        suite = suite.model_copy(update={"seed": seed_override})
    progress = _progress_fn(progress)
    if backbone.name not in suite.backbones:
        raise ValueError(f"suite {suite.name!r} applies to backbones {suite.backbones}, not {backbone.name!r}")
    evaluators = resolve_evaluators(suite)           # fail before drawing a single image
    cfg = sampler_for(suite, backbone.name)
    if suite.resolution is not None and tuple(backbone.image_size) != (suite.resolution, suite.resolution):
        raise ValueError(f"suite {suite.name!r} asks for resolution {suite.resolution} but backbone "
                         f"{backbone.name!r} draws {backbone.image_size[0]}x{backbone.image_size[1]} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_hash is None:
        checkpoint_hash = weights_hash(checkpoint_path)
    images = image_source(suite, seed_override)
    prompts = suite_prompts(suite)
    stride = index_stride(prompts)
    image_protocol = {
        "suite": images.name, "suite_version": images.version, "backbone": backbone.name,
        "checkpoint_hash": checkpoint_hash, "seed": suite.seed, "sampler": _sampler_dict(cfg),
        "resolution": list(backbone.image_size), "layout": suite.layout, "index_stride": stride,
        "prompts_sha256": prompts_digest(prompts),
    }
    protocol = {**{k: image_protocol[k] for k in ("sampler", "resolution", "layout", "index_stride", "prompts_sha256")},
                "images_per_prompt": suite.images_per_prompt, "min_images_per_tag": suite.min_images_per_tag,
                "evaluators": {e.name: e.version for e in evaluators}}
    label = {"checkpoint": str(checkpoint_path), "run": run, "step": step, "backbone": backbone.name, "method": method}
    # Under torchrun (harness.distributed) every rank runs this function: rank 0 alone holds the store (store is
    # None elsewhere) and writes the folder's protocol and metadata; the images still to draw and the records still
    # to score are split across ranks in whole batches (no padding, no duplicates, the same batches and sample
    # indices as one process); rank 0 stores every record. One process: on_main(fn) is fn().
    main = distributed.is_main()
    if not main:
        progress = None
    locked = store.evaluation_lock(suite.name, suite.version, checkpoint_hash, suite.seed, protocol) if main \
        else contextlib.nullcontext()
    with locked:
        def open_evaluation():
            done = _finished_metrics(store, suite, checkpoint_hash, protocol, label)
            if done is not None:
                return done, None
            root = run_dir(out_root, images, checkpoint_hash, seed_override)
            _prepare_folder(root, images, prompts, image_protocol)
            world = {"world_size": distributed.world_size()} if distributed.active() else {}
            eval_id = store.begin_evaluation(
                suite.name, suite.version, str(checkpoint_path), suite.seed, protocol, checkpoint_hash=checkpoint_hash,
                backbone=backbone.name, method=method, run=run, step=step, resume=True,
                provenance=provenance.collect(suite=suite.name, suite_version=suite.version, sampler=_sampler_dict(cfg),
                                              seeds={"seed": suite.seed, "index_stride": stride}, checkpoint=str(checkpoint_path),
                                              checkpoint_hash=checkpoint_hash, images=str(root),
                                              leaderboard=suite.leaderboard or suite.name,
                                              **({"train_seed": int(train_seed)} if train_seed is not None else {}), **world))
            return None, eval_id

        done, eval_id = distributed.on_main(open_evaluation)
        if done is not None:
            return done
        root = run_dir(out_root, images, checkpoint_hash, seed_override)
        module = backbone.module
        was_training = module.training
        module.eval()
        try:
            _generate_missing(backbone, suite, prompts, root, cfg, stride, batch_size, progress)
        finally:
            module.train(was_training)
        refs = _expected_refs(root, suite, prompts)
        metrics = _score_and_store(refs, evaluators, store, eval_id, suite.seed, batch_size, progress,
                                   root / "results.jsonl" if suite.layout == "geneval" else None)
        if main:
            store.finish_evaluation(eval_id)
        return metrics


def evaluate_images_dir(images_dir: str | os.PathLike, suite: Suite | str, store, *, batch_size: int = 64,
                        progress: Progress | bool | None = None, results_path: str | os.PathLike | None = None,
                        allow_partial: bool = False, tile_size: int | None = None) -> dict[str, float]:
    """Score images made elsewhere, in the suite's official layout, exactly as `evaluate` scores its own.

    GenEval layout: numbered prompt folders, each with its own metadata.jsonl and samples/<n>.png (as GenEval
    reads them); every folder must be a prompt of the suite, with the suite's prompt. DPG layout: a folder of
    2x2 grids named <prompt_id>.<ext>, cut into tiles of tile_size (the official script's --resolution; default
    the suite's resolution, else half the grid); a grid of another size is an error.

    The folder must hold every prompt of the suite with its number of images; otherwise the error lists what
    is missing. allow_partial scores what is there and stores the evaluation as partial: its protocol carries
    "partial" with the coverage, so it never shares a row with, or stands in for, a benchmark score.
    GenEval results.jsonl goes to results_path (default <images_dir>/results.jsonl).
    """
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    progress = _progress_fn(progress)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} does not exist")
    evaluators = resolve_evaluators(suite)
    prompts = suite_prompts(suite)
    if tile_size is None and suite.layout == "dpg":
        tile_size = suite.resolution
    refs = _scan_refs(images_dir, suite, prompts, tile_size)
    if not refs:
        what = "numbered prompt folders with samples/<n>.png" if suite.layout == "geneval" else "grid images"
        raise ValueError(f"{images_dir} holds no {what} (suite {suite.name!r} uses layout {suite.layout!r})")
    coverage = _coverage(prompts, refs)
    if coverage["missing"] and not allow_partial:
        shown = ", ".join(f"{pid} ({have}/{need})" for pid, have, need in coverage["missing"][:8])
        more = len(coverage["missing"]) - 8
        raise ValueError(f"{images_dir} is incomplete for suite {suite.name!r} v{suite.version}: "
                         f"{len(coverage['missing'])} of {coverage['prompts_total']} prompts lack images "
                         f"(prompt (images found/needed): {shown}{f' and {more} more' if more > 0 else ''}); "
                         f"add them, or pass --allow-partial to score what is there as a partial evaluation")
    hashed = sorted({r.path for r in refs} | {r.path.parent.parent / "metadata.jsonl" for r in refs if r.tile is None})
    images_hash = _files_digest(images_dir, hashed)
    protocol = {"source": "images", "layout": suite.layout, "evaluators": {e.name: e.version for e in evaluators}}
    if suite.layout == "dpg":
        protocol["tile_size"] = refs[0].tile_size
    if coverage["missing"]:
        protocol["partial"] = {k: v for k, v in coverage.items() if k != "missing"}
        protocol["partial"]["missing_prompts"] = [pid for pid, _, _ in coverage["missing"]]
    if coverage["missing"]:
        print(f"warning: partial evaluation of {suite.name}: {coverage['prompts_scored']} of "
              f"{coverage['prompts_total']} prompts, {coverage['images_scored']} of {coverage['images_expected']} "
              f"images; stored and shown as partial, not as a benchmark score", file=sys.stderr, flush=True)
    label = {"checkpoint": str(images_dir), "run": None, "step": None, "backbone": None, "method": None}
    with store.evaluation_lock(suite.name, suite.version, images_hash, suite.seed, protocol):
        done = _finished_metrics(store, suite, images_hash, protocol, label)
        if done is not None:
            return done
        eval_id = store.begin_evaluation(
            suite.name, suite.version, str(images_dir), suite.seed, protocol, checkpoint_hash=images_hash, resume=True,
            provenance=provenance.collect(suite=suite.name, suite_version=suite.version, images=str(images_dir),
                                          images_hash=images_hash, checkpoint_hash=images_hash))
        if results_path is None and suite.layout == "geneval":
            results_path = images_dir / "results.jsonl"
        metrics = _score_and_store(refs, evaluators, store, eval_id, suite.seed, batch_size, progress, results_path)
        store.finish_evaluation(eval_id)
        return metrics


def _coverage(prompts: list[SuitePrompt], refs: list[ImageRef]) -> dict:
    """How much of the suite a folder holds: prompts and images found against those the suite asks for."""
    found: dict[int, int] = {}
    for r in refs:
        if r.tile in (None, 0):      # one DPG grid = its prompt's 4 images
            found[r.prompt_index] = found.get(r.prompt_index, 0) + (1 if r.tile is None else 4)
    missing = [(p.prompt_id, found.get(p.index, 0), p.n_images) for p in prompts if found.get(p.index, 0) < p.n_images]
    return {"prompts_scored": sum(1 for p in prompts if found.get(p.index, 0) > 0), "prompts_total": len(prompts),
            "images_scored": sum(found.values()), "images_expected": sum(p.n_images for p in prompts),
            "missing": missing}


# --- folders ----------------------------------------------------------------------------------------------------

def _progress_fn(progress) -> Progress | None:
    if callable(progress):
        return progress
    if progress:
        def to_stderr(stage: str, done: int, total: int) -> None:
            if done in (0, total):
                print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)
        return to_stderr
    return None


def _sampler_dict(cfg) -> dict:
    from dataclasses import asdict
    return asdict(cfg)


def _sample_path(root: Path, prompt: SuitePrompt, j: int) -> Path:
    return confined(root, root / prompt.prompt_id / "samples" / f"{j:04d}.png")


def _grid_path(root: Path, prompt: SuitePrompt) -> Path:
    return confined(root, root / "grids" / f"{prompt.prompt_id}.png")


def _prepare_folder(root: Path, suite: Suite, prompts: list[SuitePrompt], image_protocol: dict) -> None:
    """Create the folder with protocol.json and (GenEval) every metadata.jsonl; refuse a folder of other images."""
    marker = root / "protocol.json"
    if marker.exists():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{marker} is corrupt ({e}); delete {root} to redraw its images") from None
        changed = sorted(k for k in set(old) | set(image_protocol) if old.get(k) != image_protocol.get(k))
        if changed:
            raise ValueError(f"{root} holds images drawn with other settings ({', '.join(changed)} differ) under "
                             f"suite {suite.name!r} version {suite.version}. Bump `version` in the suite file "
                             f"when its prompts, seed or sampler change, or delete {root}.")
    else:
        atomic_write_json(marker, image_protocol)
    if suite.layout != "geneval":
        return
    for p in prompts:
        path = confined(root, root / p.prompt_id / "metadata.jsonl")
        if path.exists():
            try:
                held = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                held = None
            if held != p.metadata:
                raise ValueError(f"{path} holds another prompt than prompt {p.index} of suite {suite.name!r} "
                                 f"v{suite.version}; bump the suite version or delete {root}")
        else:
            atomic_write_text(path, json.dumps(p.metadata) + "\n")


def _png_bytes(array: np.ndarray | Image.Image) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _cached(path: Path) -> bool:
    """An image of the cache that is there: a file with bytes (a zero-byte file, left by a full disk or copied
    badly, is drawn again; writes are atomic, so a partial file cannot come from us)."""
    return path.is_file() and path.stat().st_size > 0


def _generate_missing(backbone, suite: Suite, prompts: list[SuitePrompt], root: Path, cfg, stride: int,
                      batch_size: int, progress: Progress | None) -> int:
    """Draw every image whose file is missing, in batches, writing each file (or grid) as soon as it is whole."""
    from evaluators.dpg import make_grid

    def missing() -> list[tuple[int, int]]:
        if suite.layout == "geneval":
            return [(i, j) for i, p in enumerate(prompts) for j in range(p.n_images) if not _cached(_sample_path(root, p, j))]
        return [(i, j) for i, p in enumerate(prompts) if not _cached(_grid_path(root, p)) for j in range(p.n_images)]

    # under torchrun: rank 0 lists what is missing (before any rank writes), each rank draws a contiguous run of
    # the batches one process would draw (same batches, same global sample indices: the same images)
    todo = [(prompts[i], j) for i, j in distributed.on_main(missing)]
    starts = list(range(0, len(todo), batch_size))
    first, last = distributed.split_blocks(len(starts))
    mine = starts[first:last]
    if progress:
        progress("generate", 0, len(todo))
    tiles: dict[str, dict[int, Image.Image]] = {}
    for lo in mine:
        chunk = todo[lo:lo + batch_size]
        prompt_batch = backbone.tokenize([p.metadata["prompt"] for p, _ in chunk])
        rollout = sampling.sample(backbone, prompt_batch, cfg, seed=suite.seed,
                                  indices=[p.index * stride + j for p, j in chunk])
        arrays = images_from_codes(backbone, rollout.codes)
        for (p, j), array in zip(chunk, arrays):
            if suite.layout == "geneval":
                atomic_write_bytes(_sample_path(root, p, j), _png_bytes(array))
            else:
                tiles.setdefault(p.prompt_id, {})[j] = Image.fromarray(array)
                if len(tiles[p.prompt_id]) == p.n_images:
                    whole = tiles.pop(p.prompt_id)
                    grid = make_grid([whole[t] for t in range(p.n_images)])
                    atomic_write_bytes(_grid_path(root, p), _png_bytes(grid))
        if progress:
            progress("generate", min(lo + batch_size, len(todo)), len(todo))
    if distributed.active():   # DPG grids whose tiles were drawn on two ranks: rank 0 writes them
        left = distributed.all_gather_objects({pid: {j: np.asarray(im) for j, im in t.items()} for pid, t in tiles.items()})
        if distributed.is_main():
            by_id = {p.prompt_id: p for p in prompts}
            merged: dict[str, dict[int, np.ndarray]] = {}
            for part in left:
                for pid, t in part.items():
                    merged.setdefault(pid, {}).update(t)
            for pid, t in merged.items():
                if len(t) == by_id[pid].n_images:
                    grid = make_grid([Image.fromarray(t[j]) for j in range(by_id[pid].n_images)])
                    atomic_write_bytes(_grid_path(root, by_id[pid]), _png_bytes(grid))
        distributed.barrier()   # every image is on disk before any rank scores
    return len(todo)


def _expected_refs(root: Path, suite: Suite, prompts: list[SuitePrompt]) -> list[ImageRef]:
    if suite.layout == "geneval":
        return [ImageRef(f"{p.prompt_id}/samples/{j:04d}.png", _sample_path(root, p, j), p.metadata, p.index)
                for p in prompts for j in range(p.n_images)]
    return [ImageRef(f"{p.prompt_id}/{t}", _grid_path(root, p), p.metadata, p.index, tile=t)
            for p in prompts for t in range(4)]


def _scan_refs(images_dir: Path, suite: Suite, prompts: list[SuitePrompt], tile_size: int | None) -> list[ImageRef]:
    """The images of a folder in the suite's layout, read the way the official evaluators read them."""
    refs = []
    if suite.layout == "geneval":
        by_index = {p.index: p for p in prompts}
        for folder in sorted(d for d in images_dir.iterdir() if d.is_dir() and d.name.isdigit()):
            meta_path = folder / "metadata.jsonl"
            if not meta_path.is_file():
                raise FileNotFoundError(f"{folder} has no metadata.jsonl (GenEval layout: "
                                        f"<folder>/metadata.jsonl + <folder>/samples/<n>.png)")
            try:
                metadata = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{meta_path} is not one JSON object ({e})") from None
            if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt"), str):
                raise ValueError(f"{meta_path} must hold one JSON object with a 'prompt' (GenEval metadata), "
                                 f"not {type(metadata).__name__}")
            expected = by_index.get(int(folder.name))
            if expected is None:
                raise ValueError(f"{folder} is not a prompt folder of suite {suite.name!r} v{suite.version} "
                                 f"(it has {len(prompts)} prompts, folders 00000-{len(prompts) - 1:05d})")
            if metadata["prompt"] != expected.metadata["prompt"]:
                raise ValueError(f"{meta_path} holds prompt {metadata['prompt'][:80]!r}, but prompt "
                                 f"{expected.index} of suite {suite.name!r} is {expected.metadata['prompt'][:80]!r}")
            samples = folder / "samples"
            if not samples.is_dir():   # the official script fails on such a folder; so do we, naming it
                raise FileNotFoundError(f"{folder} has no samples/ folder (GenEval layout: "
                                        f"<folder>/samples/<n>.png)")
            names = sorted(f.name for f in samples.iterdir() if _SAMPLE_NAME.match(f.name))
            for n in names:
                if not (samples / n).is_file():
                    raise ValueError(f"{samples / n} is not an image file")
            refs += [ImageRef(f"{folder.name}/samples/{n}", samples / n, metadata, int(folder.name)) for n in names]
        return refs
    from evaluators.dpg import image_key
    by_id = {p.prompt_id: p for p in prompts}
    files = sorted(f for f in images_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    unknown = [f.name for f in files if image_key(f.name) not in by_id]
    if unknown:
        raise ValueError(f"{images_dir}: grid(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not prompts "
                         f"of suite {suite.name!r} v{suite.version} (grids are named <prompt_id>.png)")
    for f in files:
        size = _image_size(f)
        if tile_size is None:    # no resolution given: the first grid sets it, every grid must then match
            if size[0] != size[1] or size[0] % 2:
                raise ValueError(f"{f} is {size[0]}x{size[1]}, not a square 2x2 grid; pass --resolution (the side "
                                 f"of one image, as the official script's --resolution)")
            tile_size = size[0] // 2
        if size != (2 * tile_size, 2 * tile_size):
            raise ValueError(f"{f} is {size[0]}x{size[1]}, but a 2x2 grid of {tile_size} px images is "
                             f"{2 * tile_size}x{2 * tile_size}; pass --resolution with the side of one image")
        p = by_id[image_key(f.name)]
        refs += [ImageRef(f"{p.prompt_id}/{t}", f, p.metadata, p.index, tile=t, tile_size=tile_size) for t in range(4)]
    return refs


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is not a readable image ({e}); replace or delete it") from None


def _files_digest(base: Path, files: list[Path]) -> str:
    import hashlib
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(base).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


# --- scoring ----------------------------------------------------------------------------------------------------

def _load_images(refs: list[ImageRef]) -> list[np.ndarray]:
    """RGB uint8 arrays; a DPG grid is opened once and split into its 4 tiles. A file that does not decode
    (truncated, not an image) is an error naming it."""
    from evaluators.dpg import split_grid
    grids: dict[Path, list[Image.Image]] = {}
    out = []
    for r in refs:
        if not r.path.is_file():
            raise FileNotFoundError(f"image {r.path} is missing (was the folder changed during the run?)")
        try:
            if r.tile is None:
                with Image.open(r.path) as im:
                    out.append(np.asarray(im.convert("RGB")))
            else:
                if r.path not in grids:
                    with Image.open(r.path) as im:
                        grids[r.path] = split_grid(im.convert("RGB"), r.tile_size)
                out.append(np.asarray(grids[r.path][r.tile]))
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"{r.path} is not a readable image ({e}); replace or delete it") from None
    return out


def _score_and_store(refs: list[ImageRef], evaluators: list[Evaluator], store, eval_id: int, seed: int,
                     batch_size: int, progress: Progress | None, results_path) -> dict[str, float]:
    """Score the refs without a record (chunk by chunk, each chunk committed), then aggregate all of them.
    Under torchrun (store on rank 0 only) the chunks go round-robin to the ranks, W chunks a round; each round's
    records are gathered to rank 0 and stored in chunk order, so a killed run keeps every finished round."""
    scored = distributed.on_main(lambda: {e.name: store.existing_keys(eval_id, e.name) for e in evaluators})
    todo = [r for r in refs if any(r.key not in scored[e.name] for e in evaluators)]
    chunk_size = max(batch_size, 16)
    if progress:
        progress("score", 0, len(todo))
    world, me = distributed.world_size(), distributed.rank()
    starts = list(range(0, len(todo), chunk_size))
    for round_lo in range(0, len(starts), world):
        found: list[tuple[str, dict]] = []
        if round_lo + me < len(starts):
            lo = starts[round_lo + me]
            chunk = todo[lo:lo + chunk_size]
            samples = [Sample(key=r.key, metadata=r.metadata, image=im, prompt_index=r.prompt_index, seed=seed)
                       for r, im in zip(chunk, _load_images(chunk))]
            for e in evaluators:
                missing = [s for s in samples if s.key not in scored[e.name]]
                if missing:
                    if world == 1:
                        store.add_records(eval_id, e.name, e.score(missing))
                    else:
                        found.append((e.name, e.score(missing)))
        if world > 1:
            every = distributed.all_gather_objects(found)
            if distributed.is_main():
                for part in every:
                    for name, records in part:
                        store.add_records(eval_id, name, records)
        if progress:
            progress("score", min(starts[min(round_lo + world, len(starts)) - 1] + chunk_size, len(todo)), len(todo))
    return distributed.on_main(lambda: _aggregate(refs, evaluators, store, eval_id, results_path))


def _aggregate(refs: list[ImageRef], evaluators: list[Evaluator], store, eval_id: int, results_path) -> dict[str, float]:
    metrics: dict[str, float] = {}
    wrote_results = False
    for e in evaluators:
        stored = store.records_for(eval_id, e.name)
        records = [stored[r.key] for r in refs]      # the suite's images only, in a fixed order
        found = e.aggregate(records)
        store.set_metrics(eval_id, e.name, [m.as_dict() for m in found])
        for m in found:
            metrics[m.name if m.name not in metrics else f"{e.name}:{m.name}"] = float(m.value)
        if results_path is not None and not wrote_results and GENEVAL_RESULT_FIELDS <= set(records[0]):
            from evaluators.geneval import write_results_jsonl
            write_results_jsonl(results_path, [{k: r[k] for k in r} for r in records])
            wrote_results = True
    return metrics


def _finished_metrics(store, suite: Suite, checkpoint_hash: str, protocol: dict, label: dict) -> dict[str, float] | None:
    """Metrics of a finished evaluation with the same identity (suite, version, checkpoint hash, seed, protocol),
    or None. When that evaluation was stored under another label (checkpoint path, run, step, backbone, method),
    e.g. an unchanged checkpoint saved at two steps, its records and metrics are copied under this label."""
    row = store.conn.execute(
        "SELECT * FROM evaluations WHERE suite = ? AND suite_version = ? AND checkpoint_hash = ? AND seed = ? "
        "AND protocol_json = ? AND status = 'complete' ORDER BY id DESC LIMIT 1",
        (suite.name, suite.version, checkpoint_hash, int(suite.seed), json.dumps(protocol, sort_keys=True))).fetchone()
    if row is None:
        return None
    metrics = store.conn.execute("SELECT * FROM metrics WHERE evaluation_id = ? ORDER BY rowid", (row["id"],)).fetchall()
    if any(row[k] != v for k, v in label.items()):
        new_id = store.begin_evaluation(
            suite.name, suite.version, label["checkpoint"], suite.seed, protocol, checkpoint_hash=checkpoint_hash,
            backbone=label["backbone"], method=label["method"], run=label["run"], step=label["step"], resume=False,
            provenance={**json.loads(row["provenance_json"]), "copied_from_evaluation": row["id"]})
        for evaluator in dict.fromkeys(m["evaluator"] for m in metrics):
            store.add_records(new_id, evaluator, store.records_for(row["id"], evaluator))
            store.set_metrics(new_id, evaluator, [{k: m[k] for k in ("name", "value", "scale", "higher_is_better",
                                                                    "version")} for m in metrics
                                                  if m["evaluator"] == evaluator])
        store.finish_evaluation(new_id)
    out: dict[str, float] = {}
    for m in metrics:
        out[m["name"] if m["name"] not in out else f"{m['evaluator']}:{m['name']}"] = float(m["value"])
    return out
