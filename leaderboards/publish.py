"""`harness leaderboard`: the leaderboard markdown or the HTML report of a results store, written atomically, and
each trained checkpoint's gain over its base model printed with its error bar (leaderboards/gain.py).

Imports run one way: leaderboard (tables) <- gain, report <- publish."""
from __future__ import annotations

from pathlib import Path

from harness.io import atomic_write_text
from harness.store import ResultsStore, default_store_path
from leaderboards.gain import FULL_RESULT, Gain, gains_over_base
from leaderboards.leaderboard import build_tables, markdown_table, render_markdown

def open_store(store: ResultsStore | str | Path | None) -> tuple[ResultsStore, bool]:
    """(store, opened_here). A path that does not exist is an error, not a new empty store."""
    if isinstance(store, ResultsStore):
        return store, False
    path = Path(store) if store is not None else default_store_path()
    if not path.exists():
        raise FileNotFoundError(f"results store {path} does not exist; pass --store PATH or set $HARNESS_STORE "
                                "to the store your evaluations wrote")
    return ResultsStore(path, readonly=True), True


def gains_markdown(gains: list[Gain]) -> str:
    """The section of the leaderboard that says what a checkpoint's number means against its base."""
    if not gains:
        return ""
    import pandas as pd
    table = pd.DataFrame([{"Suite": g.suite, "Method": g.method, "Run": g.run, "Step": g.step,
                           "Base": f"{g.base:.3f}", "Checkpoint": f"{g.value:.3f}",
                           "Gain ± s.e.": f"{g.gain:+.3f} ± {g.stderr:.3f}", "Images": g.n_images,
                           "Measured improvement": "yes" if g.significant else "no"} for g in gains])
    return "\n".join(["## Gain over the base model", "",
                      "_Paired over the same prompts and image seeds; s.e. = the evaluation's own standard error of "
                      "the gain. A gain under twice it is noise, not an improvement. A few training steps on the "
                      f"tiny default move the score by about that much; the result to compare with is {FULL_RESULT}._",
                      "", markdown_table(table), ""])


def cli_leaderboard(store: ResultsStore | str | Path | None = None, out: str | Path | None = None,
                    fmt: str = "md") -> str:
    """Write the leaderboard (fmt "md" or "html") atomically; print the gains over the base and the path written.
    Default out: leaderboard.<fmt> beside the store file."""
    if fmt not in ("md", "html"):
        raise ValueError(f"leaderboard format must be 'md' or 'html', not {fmt!r}")
    results, opened = open_store(store)
    try:
        frame = results.latest_metrics()
        gains = gains_over_base(results, frame)
        if fmt == "md":
            text = render_markdown(build_tables(frame)) + "\n" + gains_markdown(gains)
        else:
            from leaderboards.report import build_report
            text = build_report(results, frame, gains=gains)
        path = Path(out) if out is not None else results.path.parent / f"leaderboard.{fmt}"
    finally:
        if opened:
            results.close()
    atomic_write_text(path, text)
    for g in gains:
        print(g.line())
    if gains and not any(g.significant for g in gains):
        print(f"no checkpoint here is a measured improvement over its base; see {FULL_RESULT}")
    print(path)
    return str(path)
