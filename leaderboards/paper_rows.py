"""The HT-GRPO paper's published result rows (arXiv 2605.16842, Tables 1-3), as data.

These are reference numbers copied from the paper, shown on the leaderboard as "reported" rows.
They were produced under the paper's own generation protocol (not recorded in the paper), so
they are never averaged with, or ranked against, measured rows. Bold marks are dropped.

Known oddities of the printed numbers (kept as printed):
- MMaDA base GenEval: the six tags average to 0.535, the paper prints 0.56 overall.
- Lumina-DiMOO base (0.83 GenEval, 81.86 DPG) is below Lumina-DiMOO's own report (0.88, 86.04):
  the paper used its own, probably cheaper, generation protocol.
- There is no UniGRPO row in Table 2.
- Table 3's six metrics are computed on DPG-Bench images.

Names: dMLLM rows use the harness registry names (backbone "mmada" / "lumina-dimoo", method
"maskgrpo", "tracegrpo", "ht-grpo"; "unigrpo" has no harness method; "base" is the untrained
model) so they sit next to measured rows; text-to-image models keep the paper's name as backbone
and have method "–".
Metric names are the store's: geneval_<tag> / geneval_overall (fractions), dpg_<l1> / dpg_overall
(0-100), and for Table 3 the names below in QUALITY_METRICS.
"""
from __future__ import annotations

from dataclasses import dataclass

PAPER = "arXiv 2605.16842 (HT-GRPO)"

GENEVAL_METRICS = ("geneval_single_object", "geneval_two_object", "geneval_counting", "geneval_colors",
                   "geneval_position", "geneval_color_attr", "geneval_overall")
DPG_METRICS = ("dpg_global", "dpg_entity", "dpg_attribute", "dpg_relation", "dpg_other", "dpg_overall")
QUALITY_METRICS = ("deqa", "imagereward", "hpsv3", "unipercept_aesthetics", "unipercept_quality",
                   "unipercept_structure")


@dataclass(frozen=True)
class ReportedRow:
    table: str        # leaderboard table key: "geneval", "dpg" or "quality"
    source: str       # where in the paper, e.g. "Tab. 1"
    backbone: str
    method: str
    values: dict[str, float]


def _rows(table: str, source: str, metrics: tuple[str, ...], rows: list[tuple]) -> list[ReportedRow]:
    out = []
    for backbone, method, *numbers in rows:
        if len(numbers) != len(metrics):
            raise ValueError(f"paper row {backbone} {method} in {source} has {len(numbers)} numbers, "
                             f"expected {len(metrics)}")
        out.append(ReportedRow(table, source, backbone, method, dict(zip(metrics, numbers))))
    return out


# Table 1: GenEval. Columns: single, two, counting, colors, position, colour attribute, overall.
GENEVAL_ROWS = _rows("geneval", "Tab. 1", GENEVAL_METRICS, [
    ("SDXL", "–", 0.98, 0.74, 0.39, 0.85, 0.15, 0.23, 0.55),
    ("DALL-E 3", "–", 0.96, 0.87, 0.47, 0.83, 0.43, 0.45, 0.67),
    ("Janus-Pro", "–", 0.99, 0.89, 0.59, 0.90, 0.79, 0.66, 0.80),
    ("FLUX.1-dev", "–", 0.98, 0.93, 0.75, 0.93, 0.68, 0.65, 0.82),
    ("mmada", "base", 0.96, 0.60, 0.45, 0.81, 0.14, 0.25, 0.56),
    ("mmada", "unigrpo", 0.99, 0.76, 0.61, 0.84, 0.20, 0.37, 0.63),
    ("mmada", "maskgrpo", 0.99, 0.85, 0.66, 0.89, 0.73, 0.69, 0.80),
    ("mmada", "tracegrpo", 1.00, 0.87, 0.72, 0.92, 0.64, 0.62, 0.79),
    ("mmada", "ht-grpo", 1.00, 0.92, 0.77, 0.90, 0.73, 0.66, 0.83),
    ("lumina-dimoo", "base", 0.99, 0.94, 0.70, 0.85, 0.81, 0.71, 0.83),
    ("lumina-dimoo", "maskgrpo", 1.00, 0.90, 0.88, 0.89, 0.85, 0.77, 0.88),
    ("lumina-dimoo", "tracegrpo", 1.00, 0.90, 0.85, 0.90, 0.88, 0.73, 0.87),
    ("lumina-dimoo", "ht-grpo", 1.00, 0.95, 0.94, 0.93, 0.93, 0.75, 0.92),
])

# Table 2: DPG-Bench. Columns: global, entity, attribute, relation, other, overall.
DPG_ROWS = _rows("dpg", "Tab. 2", DPG_METRICS, [
    ("SDXL", "–", 83.27, 82.43, 80.91, 86.76, 80.41, 74.65),
    ("DALL-E 3", "–", 90.97, 89.61, 88.39, 90.58, 89.83, 83.50),
    ("Janus-Pro", "–", 86.90, 88.90, 89.40, 89.32, 89.48, 84.19),
    ("FLUX.1-dev", "–", 74.35, 90.00, 88.96, 90.87, 88.33, 83.84),
    ("mmada", "base", 77.52, 77.52, 77.67, 81.56, 63.13, 70.51),
    ("mmada", "maskgrpo", 80.92, 79.52, 85.41, 83.05, 69.12, 75.81),
    ("mmada", "tracegrpo", 82.34, 78.92, 81.29, 82.08, 70.21, 74.37),
    ("mmada", "ht-grpo", 89.76, 87.62, 86.58, 88.86, 81.83, 81.09),
    ("lumina-dimoo", "base", 81.17, 89.96, 88.10, 89.64, 79.95, 81.86),
    ("lumina-dimoo", "maskgrpo", 82.65, 89.50, 88.33, 88.60, 88.24, 82.24),
    ("lumina-dimoo", "tracegrpo", 84.89, 89.65, 88.23, 90.24, 84.28, 82.62),
    ("lumina-dimoo", "ht-grpo", 88.04, 91.22, 88.98, 92.56, 83.05, 84.47),
])

# Table 3: quality / preference metrics on DPG-Bench images. Columns: DeQA (1-5), ImageReward,
# HPSv3, UniPercept aesthetics / quality / structure (0-100). All higher is better.
QUALITY_ROWS = _rows("quality", "Tab. 3", QUALITY_METRICS, [
    ("mmada", "base", 3.91, 0.64, 8.81, 58.83, 65.29, 47.46),
    ("mmada", "maskgrpo", 4.05, 0.83, 9.40, 59.02, 67.07, 48.15),
    ("mmada", "tracegrpo", 4.08, 0.84, 9.56, 58.78, 66.87, 49.04),
    ("mmada", "ht-grpo", 4.07, 0.86, 10.46, 59.29, 67.91, 49.45),
    ("lumina-dimoo", "base", 4.03, 0.84, 11.60, 56.66, 66.27, 43.12),
    ("lumina-dimoo", "maskgrpo", 4.08, 0.90, 12.00, 56.77, 66.13, 43.55),
    ("lumina-dimoo", "tracegrpo", 4.10, 0.88, 11.28, 57.68, 67.21, 43.89),
    ("lumina-dimoo", "ht-grpo", 4.12, 0.97, 12.46, 58.39, 67.97, 44.97),
])

REPORTED_ROWS = GENEVAL_ROWS + DPG_ROWS + QUALITY_ROWS


def reported_rows(table: str) -> list[ReportedRow]:
    """The paper's rows for one leaderboard table, in the paper's order (empty for other tables)."""
    return [r for r in REPORTED_ROWS if r.table == table]
