"""The Reproduction page (`reproduction.html`): each headline result of Neo et al. (arXiv
2410.07149) beside ours, per run of the database, with n, a 95% interval and a link to the
page with the evidence.

The paper's values and where they come from: report/paper_reference.py. Our values and the
mapping of each paper quantity onto our tables: db/reproduction.py (computed there, so the
report runs no SQL of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from db import reproduction
from db.reproduction import Measured
from db.store import ResultsDB
from report import urls
from report.catalogue import RunInfo
from report.object_cells import ObjectCells
from report.paper_reference import PAPER, PAPER_URL, PAPER_VALUES, PaperValue
from report.site import Site


@dataclass
class OurValue:
    """One of our measurements as the page shows it (text already formatted)."""

    run_id: str
    model_id: str
    same_model: bool
    target: str
    value: str
    n: int
    interval: str
    detail: str
    evidence: str | None
    deviations: list[dict[str, Any]]
    raw: Measured


@dataclass
class ReproductionRow:
    """A paper value and every matching value of ours."""

    paper: PaperValue
    paper_value: str
    mapping: str
    ours: list[OurValue] = field(default_factory=list)


def format_value(value: float | None, unit: str, of_layers: int | None = None) -> str:
    """'71.8%', '0.82', '25.7 of 33'; an em dash for a missing value."""
    if value is None:
        return "—"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "layer":
        return f"{value:.1f}" + (f" of {of_layers}" if of_layers else "")
    return f"{value:.2f}"


def _interval(m: Measured) -> str:
    if m.ci_low is None or m.ci_high is None:
        return "—"
    return f"{format_value(m.ci_low, m.unit)} – {format_value(m.ci_high, m.unit)}"


def _detail(m: Measured) -> str:
    d = m.detail
    if m.measure.startswith("ablation"):
        return (
            f"condition {d['condition']}: {d['flipped']} of {m.n} baseline-correct images flipped; "
            f"{d['mean_tokens_ablated']:.1f} of {d['image_tokens']} image tokens ablated on average"
        )
    if m.measure.startswith("lens"):
        return (
            f"{d['decoded_positions']} of {d['object_positions']} object-patch positions decoded, "
            f"{d['images']} images, {d['hidden_states']} hidden states"
        )
    source, target, preset = m.target.split("|")
    return (
        f"{source} blocked from {target}, preset {preset} (layers {d['layer_start']}–{d['layer_end']}): "
        f"{d['kept']} of {m.n} baseline-correct images still correct"
    )


def _evidence(m: Measured, dir_names: dict[str, str], experiment_paths: set[str]) -> str | None:
    dir_name = dir_names.get(m.run_id)
    if dir_name is None:
        return None
    if m.experiment == "lens":
        return f"{urls.QUANTITATIVE}#run-{dir_name}"
    path = urls.experiment_page(m.experiment, dir_name)
    return path if path in experiment_paths else None


def reproduction_rows(
    measured: list[Measured], dir_names: dict[str, str], experiment_paths: set[str], hit_rule: str = "word"
) -> list[ReproductionRow]:
    """One row per paper value, with our values of the same measure and target."""
    rows = []
    for paper in PAPER_VALUES:
        row = ReproductionRow(
            paper,
            format_value(paper.value, paper.unit, paper.of_layers),
            reproduction.MAPPINGS[paper.measure].format(hit_rule=hit_rule),
        )
        for m in measured:
            if m.measure != paper.measure or m.target not in paper.targets:
                continue
            recorded = m.config.get("reproduce")
            protocol: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
            row.ours.append(
                OurValue(
                    run_id=m.run_id,
                    model_id=m.model_id,
                    same_model=m.model_id == paper.model,
                    target=m.target,
                    value=format_value(m.value, m.unit, m.of_layers),
                    n=m.n,
                    interval=_interval(m),
                    detail=_detail(m),
                    evidence=_evidence(m, dir_names, experiment_paths),
                    deviations=list(protocol.get("deviations") or []),
                    raw=m,
                )
            )
        row.ours.sort(key=lambda o: not o.same_model)  # the paper's model first
        rows.append(row)
    return rows


_NEEDS = {
    "ablation_object_flip": "a complete ablation run with condition object_1 in this setting",
    "ablation_random_flip": "an ablation run with random_k conditions in this setting",
    "lens_hit_share": "a lens run over annotated images",
    "lens_mean_layer": "a lens run over annotated images",
    "blocking_kept": "a blocking run with this source, target and preset window",
}


def write_reproduction_page(
    db: ResultsDB,
    site: Site,
    runs: list[RunInfo],
    experiment_paths: set[str],
    hit_rule: str = "word",
    objects: ObjectCells | None = None,
) -> int:
    """Write reproduction.html (lens hits counted by `hit_rule`, on the build's object cells
    `objects`); returns how many paper values have at least one value of ours."""
    objects = ObjectCells.from_db(db) if objects is None else objects
    measured = reproduction.headline_measures(db, objects, hit_rule)
    dir_names = {run.run_id: run.dir_name for run in runs}
    rows = reproduction_rows(measured, dir_names, experiment_paths, hit_rule)
    used = {m.run_id for m in measured}
    site.render(
        "reproduction.html.j2",
        urls.REPRODUCTION,
        rows=rows,
        needs=_NEEDS,
        paper=PAPER,
        paper_url=PAPER_URL,
        runs_here=[run for run in runs if run.run_id in used],
    )
    return sum(1 for row in rows if row.ours)
