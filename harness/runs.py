"""The run folder: the one module that knows its layout.

    RUN/config.yaml                     the run's training config (resume keeps it; only --steps changes it)
    RUN/metrics.jsonl                   one line per training step
    RUN/tb/                             TensorBoard events
    RUN/eval/                           images drawn when checkpoints are scored during training
    RUN/checkpoints/step_000010/        one checkpoint: model.safetensors (tiny, full) or adapter.safetensors
                                        (LoRA), trainer_state.pt, config.yaml (the config it was trained with),
                                        metrics.json (its step's log line)
    RUN/checkpoints/.tmp_step_*_<pid>/  a checkpoint being written (renamed into place when whole)

Everything else (the trainer, `harness eval --run`, the report) asks a RunDir; nothing parses the layout itself.
The train seed and the method come from config.yaml, never from the folder's name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "step_"
MODEL_FILE, ADAPTER_FILE = "model.safetensors", "adapter.safetensors"
WEIGHT_FILES = (MODEL_FILE, ADAPTER_FILE)
TRAINER_STATE_FILE, CONFIG_FILE, LOG_LINE_FILE = "trainer_state.pt", "config.yaml", "metrics.json"


def weights_file(folder: str | os.PathLike) -> Path:
    """The weights of a checkpoint folder (a finished one or one being written): model.safetensors or
    adapter.safetensors, an error naming both when neither is there."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"checkpoint {folder} has neither {' nor '.join(WEIGHT_FILES)}")


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint of a run."""
    run: "RunDir"
    step: int
    path: Path

    @property
    def weights(self) -> Path:
        """model.safetensors (the whole model) or adapter.safetensors (LoRA on the run's base)."""
        return weights_file(self.path)

    @property
    def is_adapter(self) -> bool:
        return self.weights.name == ADAPTER_FILE

    @property
    def trainer_state(self) -> Path:
        return self.path / TRAINER_STATE_FILE

    @property
    def log_line(self) -> Path:
        return self.path / LOG_LINE_FILE

    def identity(self) -> str:
        """The checkpoint's hash (the image cache key): its weights file alone, so deleting the trainer state to
        save space keeps its images; an adapter is hashed with the base model it was trained on."""
        import hashlib
        import json
        from harness import provenance
        weights = provenance.checkpoint_hash(self.weights)
        if not self.is_adapter:
            return weights
        trained = self.config().get("backbone") or {}
        base = {k: trained.get(k) for k in ("name", "checkpoint", "options", "dtype")}
        return hashlib.sha256(f"{weights}+{json.dumps(base, sort_keys=True)}".encode()).hexdigest()

    def config(self) -> dict:
        """The training config this checkpoint was saved with (its own copy; the run's may have more steps)."""
        from harness.config import read_yaml
        path = self.path / CONFIG_FILE
        return read_yaml(path) if path.is_file() else self.run.config()


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- files ---
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tb"

    @property
    def eval_images(self) -> Path:
        """Root of the image folders of checkpoints scored during training."""
        return self.path / "eval"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:06d}"

    def temporary_checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f".tmp_{CHECKPOINT_PREFIX}{step:06d}_{os.getpid()}"

    def temporary_checkpoints(self) -> list[tuple[Path, int | None]]:
        """(folder, writer pid) of checkpoint saves in progress or killed midway."""
        out = []
        for tmp in sorted(self.checkpoints_dir.glob(f".tmp_{CHECKPOINT_PREFIX}*")) if self.checkpoints_dir.is_dir() else []:
            pid = tmp.name.rpartition("_")[2]
            out.append((tmp, int(pid) if pid.isdigit() else None))
        return out

    # --- contents ---
    def holds_a_run(self) -> bool:
        """A run has started here (a checkpoint or a log line): a fresh start must not write into it."""
        return bool(self.checkpoints()) or self.metrics_path.exists()

    def checkpoints(self, resumable: bool = True) -> list[Checkpoint]:
        """The checkpoints by step: those a run resumes from (with a trainer state), or with resumable=False
        every one that can be scored (with weights; a trainer state deleted to save space does not matter)."""
        found = []
        for d in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*") if self.checkpoints_dir.is_dir() else []:
            step = d.name[len(CHECKPOINT_PREFIX):]
            needed = [TRAINER_STATE_FILE] if resumable else list(WEIGHT_FILES)
            if d.is_dir() and step.isdigit() and any((d / n).is_file() for n in needed):
                found.append(Checkpoint(self, int(step), d))
        return sorted(found, key=lambda c: c.step)

    def config(self) -> dict:
        from harness.config import read_yaml
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run folder (no config.yaml)")
        return read_yaml(self.config_path)

    def method(self) -> str | None:
        method = self.config().get("method") if self.config_path.is_file() else None
        return method.get("name", "ht-grpo") if isinstance(method, dict) else None

    def train_seed(self) -> int | None:
        if not self.config_path.is_file():
            return None
        seed = self.config().get("seed", 0)
        return int(seed) if isinstance(seed, int) else None


def checkpoints_in(source) -> list[Checkpoint | Path]:
    """What `source` names, as a list: a run folder -> its scorable checkpoints by step (an error when it has
    none), a run checkpoint (folder or its weights file) -> that Checkpoint, any other path -> the Path itself
    (a weights file or model folder as its loader takes it); a list -> each, in order."""
    if isinstance(source, (list, tuple)):
        return [c for item in source for c in checkpoints_in(item)]
    if isinstance(source, Checkpoint):
        return [source]
    if isinstance(source, RunDir) or (Path(source).is_dir() and (Path(source) / CONFIG_FILE).is_file()
                                      and (Path(source) / "checkpoints").is_dir()):
        run = source if isinstance(source, RunDir) else RunDir(source)
        found = run.checkpoints(resumable=False)
        if not found:
            raise FileNotFoundError(f"run {run.path} has no {run.checkpoints_dir.name}/{CHECKPOINT_PREFIX}*/ "
                                    f"folders with weights")
        return list(found)
    ckpt = checkpoint_of(source)
    return [ckpt if ckpt is not None else Path(source)]


def checkpoint_of(path: str | os.PathLike) -> Checkpoint | None:
    """The run checkpoint a path names (RUN/checkpoints/step_000100), else None (a plain weights file)."""
    p = Path(path)
    if p.is_file() and p.name in WEIGHT_FILES:
        p = p.parent
    step = p.name[len(CHECKPOINT_PREFIX):]
    if p.is_dir() and p.parent.name == "checkpoints" and p.name.startswith(CHECKPOINT_PREFIX) and step.isdigit():
        return Checkpoint(RunDir(p.parent.parent), int(step), p)
    return None


def load_checkpoint_backbone(name: str, checkpoint: str | os.PathLike | None, device: str = "cpu"):
    """Backbone `name` with the weights of `checkpoint`: a weights file or model folder as the loader takes it, or
    a run checkpoint. A LoRA checkpoint loads the run's base model (backbone.checkpoint and options of the config it
    was trained with) and its adapter on top, so a checkpoint never scores as its base model."""
    from harness import registry
    loader = registry.get("backbones", name)
    if checkpoint is None:
        return loader(device=device)
    ckpt = checkpoint_of(checkpoint)
    if ckpt is None:
        return loader(str(checkpoint), device=device)
    trained = ckpt.config().get("backbone") or {}
    if trained.get("name", "tiny") != name:
        raise ValueError(f"checkpoint {ckpt.path} was trained on backbone {trained.get('name', 'tiny')!r}, "
                         f"not {name!r}; pass --backbone {trained.get('name', 'tiny')}")
    options = dict(trained.get("options") or {})
    if not ckpt.is_adapter:
        if name != "tiny":
            raise ValueError(f"checkpoint {ckpt.path} holds a whole {name} model (model.safetensors); only LoRA "
                             f"checkpoints of {name} can be loaded")
        return loader(str(ckpt.weights), device=device)
    if name == "tiny":      # load_tiny takes no adapter: the base, then the adapter with its saved LoRA settings
        from harness.backbones.lora import load_trainable
        backbone = loader(trained.get("checkpoint"), device=device, **options)
        load_trainable(backbone, ckpt.weights)
        return backbone
    kwargs = {"dtype": trained["dtype"]} if trained.get("dtype") else {}
    return loader(trained.get("checkpoint"), device=device, lora=str(ckpt.weights), **kwargs, **options)
