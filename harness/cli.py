"""The `harness` command line: list, validate, pretrain, generate, evaluate, fetch data, train, report.

The only file of harness/ that reaches the other packages, and only through the registry or lazy imports
inside commands, so `harness --help` starts without torch. Errors are one clean message, no traceback
(HARNESS_DEBUG=1 shows it): exit code 2 for an unknown name or a wrong usage, 1 for bad input or a failure.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from pathlib import Path
from typing import Callable, Optional

import typer

from harness import registry

EXAMPLES = """Examples:

\b
  harness ls suites
  harness validate evaluators/suites/shapes-geneval.yaml
  harness generate --prompt "a photo of a red circle" --out circle.png --n 4 --grid
  harness eval --suite shapes-geneval,shapes-dpg --checkpoint runs/a/checkpoints/step_000100
  harness eval --suite all --run runs/a
  harness data fetch geneval --prompts ../shared/reference/geneval
  harness train --config configs/tiny/ht_grpo.yaml trainer.lr=1e-5
"""

app = typer.Typer(help="RL training and text-to-image evaluation of diffusion multimodal LLMs.",
                  epilog=EXAMPLES, no_args_is_help=True, add_completion=False, rich_markup_mode=None)
data_app = typer.Typer(help="Official benchmark prompt files.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


@app.callback()
def _main_options(debug: bool = typer.Option(False, "--debug", help="show the traceback of an error")):
    if debug:
        os.environ["HARNESS_DEBUG"] = "1"


# --- errors and helpers -----------------------------------------------------------------------------------------

MAX_MESSAGE = 400   # an error echoes what it names; a 100 KB prompt must not fill the terminal


def one_line(message: str) -> str:
    """An error message as one line: its lines joined with "; ", very long ones shortened in the middle."""
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip()).replace(":;", ":")
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE - 80]} ... [{len(text) - MAX_MESSAGE + 40} characters left out] ... {text[-40:]}"
    return text


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


class UsageError(ValueError):
    """A wrong or contradictory command line: exit code 2."""


def _user_error(e: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for the failures a user causes and can fix, None for a bug."""
    import sqlite3
    if isinstance(e, KeyError):            # the registry's unknown name, with its "did you mean"
        return (str(e.args[0]) if e.args else repr(e)), 2
    if isinstance(e, UsageError):
        return str(e), 2
    if isinstance(e, UnicodeDecodeError):   # a binary file where text was expected; the raiser names the file
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start})", 1
    if isinstance(e, OSError) and e.filename is not None and not str(e).count(str(e.filename)):
        return f"{e.strerror or e}: {e.filename}", 1
    if isinstance(e, (ValueError, OSError, ImportError, sqlite3.Error)):
        return str(e), 1
    return None


def clean_errors(fn: Callable) -> Callable:
    """Turn every failure into one line and an exit code instead of a traceback: a user's mistake names the file
    or key and the fix (exit 1, or 2 for usage and unknown names); a bug says it is one (exit 3). The traceback is
    shown with --debug or HARNESS_DEBUG=1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted; what was written so far is complete (writes are atomic), re-run to resume", 130)
        except Exception as e:
            if os.environ.get("HARNESS_DEBUG") == "1":
                raise
            known = _user_error(e)
            from harness.distributed import rank_prefix   # "[rank r/W] " under torchrun, "" in one process
            if known is not None:
                _fail(rank_prefix() + known[0], known[1])
            _fail(f"{rank_prefix()}internal error (a bug, please report it): {type(e).__name__}: {e}; "
                  f"re-run with --debug for the traceback", 3)
    return wrapper


def _lazy(module: str, attr: str, what: str):
    """module.attr, imported now; a clear error when the module (written by others) is not there yet."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ImportError(f"{what} is not available in this checkout ({module} is missing)") from None
        raise
    if not hasattr(mod, attr):
        raise ImportError(f"{what} is not available in this checkout ({module} has no {attr})")
    return getattr(mod, attr)


def _finite(value: Optional[float], flag: str, minimum: float | None = None, above: bool = False) -> None:
    """A number from the command line: finite (nan / inf would run and write nonsense), and in range."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise UsageError(f"{flag} must be {'>' if above else '>='} {minimum:g}, got {value:g}")


def _device(name: str) -> str:
    from harness.backbones.base import check_device
    return check_device(name)


def load_backbone(name: str, checkpoint: Optional[str], device: str = "cpu"):
    """Backbone `name` from a checkpoint file or folder; None = its default weights, "" = random (tiny). A run
    checkpoint with a LoRA adapter loads its base model and the adapter (harness.runs owns that rule)."""
    from harness.runs import load_checkpoint_backbone
    try:
        registry.get("backbones", name)
    except ImportError as e:
        raise ImportError(f"backbone {name!r} is not available in this install ({e})") from None
    return load_checkpoint_backbone(name, checkpoint, device)


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


def _progress_callback(bar, label: str):
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(f"{label} {stage}", total=total)
        bar.update(tasks[stage], completed=done, total=total)
    return update


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(title, markup=False, highlight=False)
    console.print(table)


# --- ls, validate ----------------------------------------------------------------------------------------------

@app.command("ls")
@clean_errors
def ls_cmd(kind: Optional[str] = typer.Argument(None, help="backbones, methods, evaluators or suites (default: all)")):
    """List registered names.

    Example: harness ls suites
    """
    kinds = [kind] if kind else list(registry.KINDS)
    for k in kinds:
        names = registry.names(k)
        typer.echo(f"{k}:")
        for name in names:
            typer.echo(f"  {name}{_suite_summary(name) if k == 'suites' else ''}")


def _suite_summary(name: str) -> str:
    from evaluators.suites import load_suite
    try:
        s = load_suite(name)
    except Exception as e:   # a broken suite file must not hide the others
        return f"  (invalid: {str(e).splitlines()[0]})"
    return f"  v{s.version}  backbones: {', '.join(s.backbones)}  evaluators: {', '.join(s.evaluators)}"


SUITE_KEYS = {"layout", "evaluators", "images_per_prompt", "prompts"}


@app.command("validate")
@clean_errors
def validate_cmd(config: Path = typer.Argument(..., help="a suite YAML or a training config YAML"),
                 overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides")):
    """Check a suite or training config file; errors name the key path.

    The kind is told by content: a file with layout / evaluators / prompts keys is a suite.

    Example: harness validate evaluators/suites/shapes-geneval.yaml
    """
    from harness.config import load_config, read_yaml
    data = read_yaml(config)
    if SUITE_KEYS & set(data):
        from evaluators.suites import images_per_tag_rule, load_suite, prompt_metadata, suite_prompts
        suite = load_suite(config, overrides or [])
        typer.echo(f"ok: suite {suite.name} v{suite.version} ({suite.layout} layout, "
                   f"evaluators {', '.join(suite.evaluators)})")
        try:
            metadata = prompt_metadata(suite)
            suite_prompts(suite)    # every prompt id must be usable as a file name
        except FileNotFoundError as e:
            typer.echo(f"note: prompts not available here: {e}")
            return
        per_tag = images_per_tag_rule(suite, metadata)
        n_images = sum(per_tag[m["tag"]] for m in metadata)
        typer.echo(f"  {len(metadata)} prompts, {n_images} images; images per prompt by tag: "
                   + ", ".join(f"{t} {n}" for t, n in per_tag.items()))
        for name in suite.evaluators:
            if name not in registry.names("evaluators"):
                typer.echo(f"note: evaluator {name!r} is not registered in this install; running the suite will fail")
        return
    train_config = _lazy("trainers.config", "TrainConfig", "the training config model")
    check_train_config = _lazy("trainers.loop", "check_train_config", "the training config rules")
    notes = check_train_config(load_config(train_config, config, overrides or []), for_training=False)
    typer.echo(f"ok: training config {config}")
    for note in notes:
        typer.echo(f"note: {note}")


# --- pretrain, generate ----------------------------------------------------------------------------------------

@app.command("pretrain")
@clean_errors
def pretrain_cmd(out: Path = typer.Option(Path("runs/pretrain/tiny_base.safetensors"), help="weights file to write"),
                 steps: int = typer.Option(20000, min=1), batch_size: int = typer.Option(256, min=1),
                 lr: float = typer.Option(1e-3),
                 seed: int = typer.Option(0), device: str = typer.Option("auto", help="cpu, cuda or auto"),
                 workers: int = typer.Option(0, help="data loader worker processes"),
                 snapshot_every: int = typer.Option(0, help="also save every N steps (0: never)"),
                 max_minutes: float = typer.Option(0.0, help="stop early (and save) after this long; 0: no limit"),
                 model: str = typer.Option("{}", help='JSON overrides of TinyConfig, e.g. \'{"d_model": 192}\'')):
    """Pretrain the tiny backbone on sampled shapes scenes (masked-token objective).

    Example: harness pretrain --steps 2000 --out runs/pretrain/small.safetensors --device cuda
    """
    import dataclasses
    import json
    from harness.backbones.tiny import TinyConfig
    from harness.pretrain import pretrain
    _finite(lr, "--lr", 0.0, above=True)
    _finite(max_minutes, "--max-minutes", 0.0)
    try:
        overrides = json.loads(model)
    except json.JSONDecodeError as e:
        raise UsageError(f"--model is not JSON ({e.msg}); give e.g. '{{\"d_model\": 192}}'") from None
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TinyConfig)}) \
        if isinstance(overrides, dict) else None
    if unknown is None or unknown:
        raise UsageError(f"--model must be a JSON object of TinyConfig fields; unknown: {unknown or model}")
    path = pretrain(str(out), steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=_device(device),
                    workers=workers, snapshot_every=snapshot_every, max_minutes=max_minutes, model=overrides)
    typer.echo(f"wrote {path}")


@app.command("generate")
@clean_errors
def generate_cmd(prompt: str = typer.Option(..., help="the text prompt"),
                 out: Path = typer.Option(..., help="image file to write (.png, .jpg or .webp; default .png)"),
                 checkpoint: Optional[str] = typer.Option(
                     None, help='weights file or run checkpoint folder; default: the shipped base; "" = random init'),
                 backbone: str = typer.Option("tiny"), seed: int = typer.Option(0),
                 n: int = typer.Option(1, min=1, help="number of images"),
                 grid: bool = typer.Option(False, help="with --n > 1: one grid image at --out instead of numbered files"),
                 steps: Optional[int] = typer.Option(None, min=1, help="sampler steps (default: the backbone's)"),
                 cfg: Optional[float] = typer.Option(None, help="classifier-free guidance weight"),
                 device: str = typer.Option("auto")):
    """Draw images for one prompt.

    With --n > 1 it writes numbered files OUT_STEM-000.png, OUT_STEM-001.png, ... beside --out, or with
    --grid one grid image (rows of ceil(sqrt(n))) at --out. Images depend only on (prompt, seed, index).

    Example: harness generate --prompt "a photo of two red squares" --out sq.png --n 4 --grid --seed 3
    """
    import io
    import math

    from PIL import Image

    from harness.io import atomic_write_bytes
    from harness.samples import images_from_codes
    from harness.sampling import PRESETS, generate, sampler_config

    _finite(cfg, "--cfg", 0.0)
    formats = {"": "PNG", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
    image_format = formats.get(out.suffix.lower())
    if image_format is None:
        raise UsageError(f"--out {out}: unknown image type {out.suffix!r}; use .png, .jpg or .webp")
    bb = load_backbone(backbone, checkpoint, _device(device))
    overrides = {k: v for k, v in (("steps", steps), ("cfg", cfg)) if v is not None}
    sampler = sampler_config(backbone if backbone in PRESETS else None, **overrides)
    rollout = generate(bb, [prompt] * n, sampler, seed=seed)
    images = [Image.fromarray(p) for p in images_from_codes(bb, rollout.codes)]

    def save(image, path: Path) -> Path:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **({"quality": 95} if image_format != "PNG" else {}))
        return atomic_write_bytes(path, buffer.getvalue())

    if n == 1:
        written = [save(images[0], out)]
    elif grid:
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        w, h = images[0].size
        gap = max(2, w // 32)   # a grey gutter, so white backgrounds of neighbouring images do not merge
        sheet = Image.new("RGB", (cols * (w + gap) + gap, rows * (h + gap) + gap), (128, 128, 128))
        for i, im in enumerate(images):
            sheet.paste(im, (gap + (i % cols) * (w + gap), gap + (i // cols) * (h + gap)))
        written = [save(sheet, out)]
    else:
        written = [save(im, out.with_name(f"{out.stem}-{i:03d}{out.suffix or '.png'}")) for i, im in enumerate(images)]
    for path in written:
        typer.echo(f"wrote {path}")


# --- eval -------------------------------------------------------------------------------------------------------

@app.command("eval")
@clean_errors
def eval_cmd(suite: str = typer.Option(..., help="suite name(s), comma-separated, or 'all' (every suite of --backbone)"),
             checkpoint: Optional[str] = typer.Option(None, help="weights file or checkpoint folder"),
             run: Optional[Path] = typer.Option(None, "--run", "--run-dir",
                                                help="a run folder: evaluates every checkpoints/step_*/ (--run-dir "
                                                     "under torchrun, whose parser reads --run as its --run-path)"),
             images: Optional[Path] = typer.Option(None, help="images made elsewhere, in the suite's official layout"),
             store: Optional[Path] = typer.Option(None, help="results store (default $HARNESS_STORE or results/store.sqlite)"),
             out: Optional[Path] = typer.Option(None, help="root of the image folders, the cache (default: a run's "
                                                 "own eval/ folder for its checkpoints, else results/images)"),
             backbone: str = typer.Option("tiny"), batch_size: int = typer.Option(32, min=1),
             device: str = typer.Option("auto"),
             allow_partial: bool = typer.Option(False, help="with --images: score an incomplete folder, stored and "
                                                            "shown as a partial evaluation"),
             resolution: Optional[int] = typer.Option(None, min=1, help="with --images, DPG layout: the side of one "
                                                                       "image of a 2x2 grid (official --resolution)"),
             overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value changes to every suite, "
                                                                        "e.g. evaluators=[imagereward]")):
    """Evaluate checkpoints (or a folder of images) on suites; results go to the store.

    Named suites must all be able to run (backends, model files, prompt files) or nothing starts; 'all' runs
    those that can and says why it skips the others.

    Images are cached under OUT/<suite>/<checkpoint-hash[:12]>-v<version>/: a re-run draws and scores only
    what is missing, and an interrupted run resumes.

    \b
    Examples:
      harness eval --suite shapes-geneval --checkpoint runs/a/checkpoints/step_000100
      harness eval --suite all --run runs/a
      harness eval --suite geneval --images my_geneval_images/ --backbone mmada
      harness eval --suite quality --run runs/m --backbone mmada evaluators=[imagereward,hpsv3]
    """
    from evaluators.run import evaluate_checkpoints, evaluate_images_dir, resolve_evaluators
    from evaluators.suites import load_suite, suite_prompts, suites_for_backbone
    from harness.store import ResultsStore

    sources = [x for x in (checkpoint, run, images) if x is not None]
    if len(sources) != 1:
        _fail("give exactly one of --checkpoint, --run or --images", 2)
    if images is None and (allow_partial or resolution is not None):
        _fail("--allow-partial and --resolution apply to --images only (a checkpoint's own images are complete "
              "and drawn at the backbone's resolution)", 2)
    registry.target("backbones", backbone)
    names = suites_for_backbone(backbone) if suite == "all" else [s.strip() for s in suite.split(",") if s.strip()]
    if not names:
        _fail(f"no suite applies to backbone {backbone!r}", 2)
    suites = [load_suite(name, overrides or []) for name in names]      # unknown names fail here, before any work
    runnable = []
    for s in suites:
        try:     # so does an evaluator whose backend or model files are missing, or prompts not fetched
            resolve_evaluators(s)
            suite_prompts(s)
        except (KeyError, ImportError, OSError, ValueError) as e:
            if suite != "all":
                raise
            # 'all' means every suite that can run here: say what is skipped and why, and go on
            typer.echo(f"skipping suite {s.name}: {e.args[0] if isinstance(e, KeyError) else e}", err=True)
            continue
        runnable.append(s)
    if not runnable:
        _fail(f"none of the suites of backbone {backbone!r} can run here (reasons above)", 1)
    suites = runnable

    from harness import distributed
    if images is not None and distributed.launched_world_size() > 1:
        raise UsageError("--images is scored in one process; run it without torchrun (--checkpoint and --run shard "
                         "across processes)")
    with distributed.session(), _opened_on_main(ResultsStore, store) as results, _progress_bar() as bar:
        if images is not None:
            for s in suites:
                metrics = evaluate_images_dir(images, s, results, batch_size=batch_size,
                                              progress=_progress_callback(bar, s.name), allow_partial=allow_partial,
                                              tile_size=resolution if s.layout == "dpg" else None)
                _print_metrics(f"{s.name} v{s.version}: {images}", metrics)
            return
        from harness.runs import RunDir
        if checkpoint == "":
            _fail("--checkpoint must name a weights file or folder (random weights are not evaluated)", 2)
        try:
            registry.get("backbones", backbone)
        except ImportError as e:
            raise ImportError(f"backbone {backbone!r} is not available in this install ({e})") from None
        evaluate_checkpoints(RunDir(run) if run is not None else checkpoint, suites, results, backbone=backbone,
                             out_root=out, batch_size=batch_size, device=_device(device),
                             progress_for=lambda label: _progress_callback(bar, label),
                             on_scores=lambda r: _print_metrics(f"{r.suite} v{r.suite_version}: {r.checkpoint}",
                                                                r.metrics))


def _opened_on_main(open_store, path):
    """The results store on rank 0 of a torchrun job (or in one process); None on the other ranks, which draw and
    score their share and hand the records to rank 0 (one SQLite writer)."""
    import contextlib
    from harness import distributed
    return open_store(path) if distributed.is_main() else contextlib.nullcontext(None)


# --- data -------------------------------------------------------------------------------------------------------

@data_app.command("fetch")
@clean_errors
def data_fetch_cmd(which: str = typer.Argument(..., help="geneval, dpg, hpsv3 or unipercept"),
                   prompts: Optional[Path] = typer.Option(None, help="copy this local copy instead of downloading"),
                   dest: Optional[Path] = typer.Option(None, help="data folder (default $HARNESS_DATA or ./data)")):
    """Fetch official prompt files at their pinned commits, checked by sha256.

    \b
    Examples:
      harness data fetch geneval
      harness data fetch dpg --prompts ../shared/reference/dpg/prompts
    """
    from evaluators.data import fetch
    for path in fetch(which, dest=dest, prompts=prompts):
        typer.echo(f"wrote {path}")


# --- thin commands over code in trainers/ and leaderboards/ ----------------------------------------------------

@app.command("train")
@clean_errors
def train_cmd(config: Optional[Path] = typer.Option(None, help="training config YAML (not needed with --resume)"),
              run_dir: Optional[Path] = typer.Option(None, help="where the run writes (default: runs/<name>)"),
              steps: Optional[int] = typer.Option(None, min=1, help="override the number of training steps"),
              resume: Optional[Path] = typer.Option(None, help="resume this run folder (its own config.yaml)"),
              overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides")):
    """Train with an RL method.

    A resumed run keeps its config.yaml; only --steps changes it (and says so). Settings given with --resume
    that differ from the run's are listed as ignored.

    \b
    Examples:
      harness train --config configs/tiny/ht_grpo.yaml --steps 50 optim.lr=1e-5
      harness train --resume runs/tiny-ht-grpo --steps 60
    """
    if resume is not None and run_dir is not None and run_dir.resolve() != resume.resolve():
        raise UsageError(f"--run-dir {run_dir} and --resume {resume} name different folders; give one")
    cli_train = _lazy("trainers.loop", "cli_train", "training")
    from harness import distributed
    with distributed.session():   # under torchrun / accelerate launch: the process group (docs/distributed.md)
        result = cli_train(config=config, run_dir=run_dir, steps=steps, resume=resume, overrides=list(overrides or []))
    if isinstance(result, int):
        raise typer.Exit(result)
    if result is not None and os.environ.get("RANK", "0") == "0":   # under torchrun rank 0 speaks for the job
        typer.echo(f"run: {result}")


@app.command("leaderboard")
@clean_errors
def leaderboard_cmd(store: Optional[Path] = typer.Option(None, help="results store (default $HARNESS_STORE)"),
                    out: Optional[Path] = typer.Option(None, help="file to write (default: leaderboard.<format> beside the store)"),
                    fmt: str = typer.Option("md", "--format", help="md or html")):
    """Tables of the store's results.

    Example: harness leaderboard --format html --out report.html
    """
    if fmt not in ("md", "html"):
        _fail(f"--format must be md or html, not {fmt!r}", 2)
    cli_leaderboard = _lazy("leaderboards.publish", "cli_leaderboard", "the leaderboard")
    code = cli_leaderboard(store=store, out=out, fmt=fmt)
    raise typer.Exit(code if isinstance(code, int) else 0)


@app.command("check")
@clean_errors
def check_cmd(checkpoint: Path = typer.Option(..., help="checkpoint to check"),
              baseline: Path = typer.Option(..., help="baseline metrics file"),
              tolerance: Optional[float] = typer.Option(None, help="allowed drop (default: the baseline's)"),
              update: bool = typer.Option(False, help="write the checkpoint's metrics as the new baseline")):
    """Regression check of a checkpoint against a baseline; exit code 1 on a regression.

    Example: harness check --checkpoint runs/a/checkpoints/step_000100 --baseline leaderboards/baselines/tiny.json
    """
    _finite(tolerance, "--tolerance", 0.0)
    cli_check = _lazy("leaderboards.check", "cli_check", "the regression check")
    code = cli_check(checkpoint=checkpoint, baseline=baseline, tolerance=tolerance, update=update)
    raise typer.Exit(int(code or 0))


# --- env: pinned virtualenvs for official stacks (harness/envs.py) ---------------------------------------------

env_app = typer.Typer(help="Pinned virtualenvs for official stacks that run as worker processes (harness/envs.py).",
                      no_args_is_help=True, rich_markup_mode=None)
app.add_typer(env_app, name="env")


@env_app.command("ls")
@clean_errors
def env_ls_cmd():
    """List the environments: name, built / not built / stale (its recipe changed), path, what it holds.

    Example: harness env ls
    """
    from harness import envs
    typer.echo(f"environments under {envs.root()} (${envs.ROOT_ENV}):")
    for row in envs.listing():
        typer.echo(f"  {row['name']:<22} {row['state']:<10} {row['path']}")
        typer.echo(f"  {'':<22} {row['description']}" + (f" ({row['size']})" if row['size'] else ""))


@env_app.command("build")
@clean_errors
def env_build_cmd(names: Optional[list[str]] = typer.Argument(None, help="environment names (see harness env ls)"),
                  all_envs: bool = typer.Option(False, "--all", help="build every environment"),
                  force: bool = typer.Option(False, help="rebuild even when the built one is current")):
    """Build (or reuse) pinned environments; a current one (same recipe hash) is kept as it is.

    \b
    Examples:
      harness env build dpg-official
      harness env build --all
    """
    from harness import envs
    if bool(names) == all_envs:
        raise UsageError("give environment names or --all (see `harness env ls`)")
    chosen = sorted(envs.RECIPES) if all_envs else list(dict.fromkeys(names))
    for name in chosen:
        envs.recipe(name)                # unknown names fail before anything is built
    for name in chosen:
        envs.build(name, force=force, say=lambda line: typer.echo(line, err=True))
        typer.echo(envs.env_dir(name))


@env_app.command("path")
@clean_errors
def env_path_cmd(name: str = typer.Argument(..., help="environment name")):
    """Print the folder of a built, current environment (its python is PATH/bin/python).

    Example: harness env path dpg-official
    """
    from harness import envs
    envs.require(name)
    typer.echo(envs.env_dir(name))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
