"""The paper's headline quantities measured on a results database (the Reproduction page).

Each function maps one quantity of Neo et al. (arXiv 2410.07149) onto our tables, stated
in `MAPPINGS` (shown on the page), and returns one `Measured` record per run and
condition with n and a 95% interval. Torch-free; reads only.

- ablation_object_flip / ablation_random_flip: among the images a setting answers
  correctly with nothing ablated (condition 'none'), the share whose answer becomes
  wrong under the condition (object_1; random_k with k nearest 40 x image tokens / 576).
  Wilson interval over those images.
- lens_hit_share / lens_mean_layer: object-patch positions (image positions whose patch
  overlaps a non-crowd mask of a category annotated in the image, buffer 0) of the lens
  run's completely written images; a position is decoded when, at some hidden state
  (0 = embeddings ... n-1 = last layer), its top-1 lens token names the category (rule
  'word' of db.views). Share of positions decoded, and the mean over decoded positions of
  the first such hidden-state index. Percentile bootstrap over images (db.stats).
- blocking_kept: among the images answered correctly with nothing blocked, the share
  still answered correctly under the blocking condition (source, target, preset window).
  Wilson interval. With curation (every kept image baseline-correct) this is the
  condition's accuracy relative to the baseline's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from db import queries
from db.stats import bootstrap_ratio_ci, wilson_interval
from db.store import ResultsDB
from db.views import HIT_RULES

PAPER_IMAGE_TOKENS = 576
PAPER_RANDOM_K = 40

MAPPINGS: dict[str, str] = {
    "ablation_object_flip": (
        "Share of baseline-correct images (condition 'none' correct in that setting) whose answer becomes "
        "wrong when the object's patch tokens plus one ring of neighbours (condition object_1) are replaced "
        "by the mean vector at the LM input; 95% Wilson interval over those images."
    ),
    "ablation_random_flip": (
        "The same share for random_k, k image tokens drawn at random, with k the run's k nearest to "
        "40 x (image tokens / 576) (40 with 576 image tokens); 95% Wilson interval."
    ),
    "lens_hit_share": (
        "Object-patch positions (image positions whose patch overlaps a mask of a category annotated in the "
        "image, no buffer) whose top-1 logit-lens token names the category (rule '{hit_rule}' of the view "
        "lens_object_hits) at one or more hidden states, over all object-patch positions, pooled over the "
        "run's images; 95% percentile bootstrap over images (2000 resamples)."
    ),
    "lens_mean_layer": (
        "Over the decoded object-patch positions, the mean index of the first hidden state at which the "
        "class is decoded (0 = embeddings, last = n_layers - 1; the paper's model has 33 hidden states, so "
        "'of 33'); 95% percentile bootstrap over images."
    ),
    "blocking_kept": (
        "Share of baseline-correct images (nothing blocked) still answered correctly ('... It is a <class>') "
        "when the target positions cannot attend to the source positions in the preset window's layers "
        "(windows of the 32-layer paper scaled to the model's depth); 95% Wilson interval."
    ),
}


@dataclass
class Measured:
    """One of our values for a headline quantity: a run, a condition, the value with n and interval.

    value, ci_low, ci_high: in `unit` ('%', 'share' or 'layer'); n: the unit of the interval's
    resampling or the denominator (images for Wilson, images for the bootstrap); detail: the
    counts behind the value.
    """

    measure: str
    target: str
    run_id: str
    model_id: str
    experiment: str
    value: float | None
    n: int
    ci_low: float | None
    ci_high: float | None
    unit: str
    detail: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    of_layers: int | None = None


def find_mean_vector(db: ResultsDB, key: str) -> str | None:
    """The id of a stored mean vector whose config carries `reproduce_mean_key` = key, if any."""
    rows = db.sql(
        "SELECT vector_id FROM mean_vectors WHERE json_extract_string(config, '$.reproduce_mean_key') = ? "
        "ORDER BY created_at, vector_id LIMIT 1",
        (key,),
    )
    return str(rows[0][0]) if rows else None


def _percent_wilson(successes: int, n: int) -> tuple[float | None, float | None, float | None]:
    interval = wilson_interval(successes, n)
    if interval is None:
        return None, None, None
    return 100.0 * successes / n, 100.0 * interval[0], 100.0 * interval[1]


# -- ablation ------------------------------------------------------------------------------------


def ablation_flip_counts(db: ResultsDB, run_id: str) -> dict[tuple[str, str], tuple[int, int, float]]:
    """(setting, condition) -> (baseline-correct images with the condition, flipped, mean tokens ablated)."""
    rows = db.sql(
        """
        SELECT a.setting, a.condition, count(*), count(*) FILTER (WHERE NOT a.correct), avg(a.n_ablated)
        FROM ablations a
        JOIN (SELECT image_id, setting FROM ablations WHERE run_id = ? AND condition = 'none' AND correct) b
          USING (image_id, setting)
        WHERE a.run_id = ?
        GROUP BY a.setting, a.condition
        """,
        (run_id, run_id),
    )
    return {(setting, condition): (int(n), int(flipped), float(mean)) for setting, condition, n, flipped, mean in rows}


def image_token_count(db: ResultsDB, run_id: str) -> int | None:
    """Image tokens of the run's patch grid (grid_rows x grid_cols of its images), the largest."""
    rows = db.sql("SELECT max(grid_rows * grid_cols) FROM run_images WHERE run_id = ?", (run_id,))
    return int(rows[0][0]) if rows and rows[0][0] is not None else None


def matched_random_k(available: list[int], n_image_tokens: int | None) -> int | None:
    """The k of `available` nearest to 40 x n_image_tokens / 576 (ties: the larger k)."""
    if not available:
        return None
    wanted = PAPER_RANDOM_K * (n_image_tokens or PAPER_IMAGE_TOKENS) / PAPER_IMAGE_TOKENS
    return min(available, key=lambda k: (abs(k - wanted), -k))


def ablation_measures(db: ResultsDB, run: queries.RunRecord) -> list[Measured]:
    counts = ablation_flip_counts(db, run.run_id)
    random_ks = sorted(
        {int(c.split("_", 1)[1]) for _, c in counts if c.startswith("random_") and c.split("_", 1)[1].isdigit()}
    )
    n_tokens = image_token_count(db, run.run_id)
    k = matched_random_k(random_ks, n_tokens)
    out = []
    for setting in sorted({s for s, _ in counts}):
        for measure, condition in (("ablation_object_flip", "object_1"), ("ablation_random_flip", f"random_{k}")):
            if k is None and measure == "ablation_random_flip":
                continue
            n, flipped, mean_ablated = counts.get((setting, condition), (0, 0, 0.0))
            value, low, high = _percent_wilson(flipped, n)
            out.append(
                Measured(
                    measure,
                    setting,
                    run.run_id,
                    run.model_id,
                    run.experiment,
                    value,
                    n,
                    low,
                    high,
                    "%",
                    {
                        "condition": condition,
                        "flipped": flipped,
                        "mean_tokens_ablated": mean_ablated,
                        "image_tokens": n_tokens,
                    },
                    run.config,
                )
            )
    return out


# -- logit lens ----------------------------------------------------------------------------------


@dataclass
class LensImageHits:
    """One image of a lens run: object-patch positions, how many are decoded, the sum of their
    first decoded hidden-state indices."""

    image_id: int
    object_positions: int
    decoded: int
    first_layer_sum: int


class ObjectCellSource(Protocol):
    """The object cells of every (run, image): report.object_cells.ObjectCells, which the report
    build rasterises once per image for all its pages."""

    def annotated(self, run_id: str, image_id: int) -> bool: ...

    def cells(self, run_id: str, image_id: int, grid_rows: int, grid_cols: int) -> dict[str, np.ndarray]: ...


def lens_object_positions(
    db: ResultsDB, run_id: str, objects: ObjectCellSource
) -> tuple[pa.Table, dict[int, int], int]:
    """Every (image_id, category, position) object-patch triple of the run's completely written,
    unskipped images; per image its number of triples; the run's hidden-state count."""
    grids = {
        int(image_id): (int(rows), int(cols), int(layers or 0))
        for image_id, rows, cols, layers in db.sql(
            "SELECT image_id, grid_rows, grid_cols, n_layers FROM run_images ri WHERE run_id = ? "
            "AND NOT EXISTS (SELECT 1 FROM skipped s WHERE s.run_id = ri.run_id AND s.image_id = ri.image_id)",
            (run_id,),
        )
    }
    columns: dict[str, list[Any]] = {"image_id": [], "category": [], "position": []}
    per_image: dict[int, int] = {}
    n_layers = 0
    annotated = [image_id for image_id in sorted(grids) if objects.annotated(run_id, image_id)]
    positions: dict[int, dict[int, queries.Position]] = {}
    for at, image_id in enumerate(annotated):
        grid_rows, grid_cols, layers = grids[image_id]
        n_layers = max(n_layers, layers)
        if image_id not in positions:
            # A batch of images at a time: a paper-scale run has millions of positions.
            batch = annotated[at : at + queries.POSITION_BATCH]
            positions = queries.positions_by_image(db, run_id, kind="image", image_ids=batch)
        cells = objects.cells(run_id, image_id, grid_rows, grid_cols)
        by_cell = {(p.patch_row, p.patch_col): number for number, p in positions.get(image_id, {}).items()}
        for category, grid in sorted(cells.items()):
            rows, cols = np.nonzero(grid)
            found = [by_cell[(int(r), int(c))] for r, c in zip(rows, cols) if (int(r), int(c)) in by_cell]
            columns["image_id"] += [image_id] * len(found)
            columns["category"] += [category] * len(found)
            columns["position"] += found
            per_image[image_id] = per_image.get(image_id, 0) + len(found)
    table = pa.table(
        {
            "image_id": pa.array(columns["image_id"], pa.int64()),
            "category": pa.array(columns["category"], pa.string()),
            "position": pa.array(columns["position"], pa.int32()),
        }
    )
    return table, per_image, n_layers


def lens_image_hits(
    db: ResultsDB, run_id: str, objects: ObjectCellSource, hit_rule: str = "word"
) -> tuple[list[LensImageHits], int]:
    """Per image with object-patch positions: decoded positions and their first layers; the
    run's hidden-state count. `hit_rule` is the lens hit rule (db.views.HIT_RULES)."""
    if hit_rule not in HIT_RULES:
        raise ValueError(f"unknown lens hit rule {hit_rule!r} (one of {', '.join(HIT_RULES)})")
    table, per_image, n_layers = lens_object_positions(db, run_id, objects)
    if not per_image:
        return [], n_layers
    # The quantitative page's hit query: only the object positions' rows, each distinct token
    # normalised once (the view's form normalises every lens row of the run).
    decoded = queries.object_first_top1_layers(db, run_id, table, hit_rule)
    images = [
        LensImageHits(image_id, total, *decoded.get(image_id, (0, 0)))
        for image_id, total in sorted(per_image.items())
        if total > 0
    ]
    return images, n_layers


def lens_measures(
    db: ResultsDB, run: queries.RunRecord, objects: ObjectCellSource, hit_rule: str = "word"
) -> list[Measured]:
    images, n_layers = lens_image_hits(db, run.run_id, objects, hit_rule)
    if not images:
        return []
    positions = np.array([i.object_positions for i in images], dtype=np.float64)
    decoded = np.array([i.decoded for i in images], dtype=np.float64)
    layer_sums = np.array([i.first_layer_sum for i in images], dtype=np.float64)
    detail = {
        "images": len(images),
        "object_positions": int(positions.sum()),
        "decoded_positions": int(decoded.sum()),
        "hidden_states": n_layers,
    }
    share_ci = bootstrap_ratio_ci(decoded, positions)
    out = [
        Measured(
            "lens_hit_share",
            "",
            run.run_id,
            run.model_id,
            run.experiment,
            100.0 * decoded.sum() / positions.sum(),
            len(images),
            None if share_ci is None else 100.0 * float(share_ci[0]),
            None if share_ci is None else 100.0 * float(share_ci[1]),
            "%",
            detail,
            run.config,
            of_layers=n_layers,
        )
    ]
    layer_ci = bootstrap_ratio_ci(layer_sums, decoded) if decoded.sum() > 0 else None
    out.append(
        Measured(
            "lens_mean_layer",
            "",
            run.run_id,
            run.model_id,
            run.experiment,
            float(layer_sums.sum() / decoded.sum()) if decoded.sum() > 0 else None,
            len(images),
            None if layer_ci is None else float(layer_ci[0]),
            None if layer_ci is None else float(layer_ci[1]),
            "layer",
            detail,
            run.config,
            of_layers=n_layers,
        )
    )
    return out


# -- attention blocking --------------------------------------------------------------------------


def blocking_kept_counts(db: ResultsDB, run_id: str) -> dict[tuple[str, str, str], tuple[int, int, int, int]]:
    """(source, target, preset) -> (baseline-correct images with the condition, still correct,
    layer_start, layer_end) over the run's preset windows."""
    rows = db.sql(
        """
        SELECT b.source, b.target, b.preset, count(*), count(*) FILTER (WHERE b.correct),
               min(b.layer_start), max(b.layer_end)
        FROM blocking b
        JOIN (SELECT image_id FROM blocking WHERE run_id = ? AND window_kind = 'baseline' AND correct) base
          USING (image_id)
        WHERE b.run_id = ? AND b.window_kind = 'preset'
        GROUP BY b.source, b.target, b.preset
        """,
        (run_id, run_id),
    )
    return {(s, t, p): (int(n), int(kept), int(lo), int(hi)) for s, t, p, n, kept, lo, hi in rows}


def blocking_measures(db: ResultsDB, run: queries.RunRecord) -> list[Measured]:
    out = []
    for (source, target, preset), (n, kept, start, end) in sorted(blocking_kept_counts(db, run.run_id).items()):
        interval = wilson_interval(kept, n)
        out.append(
            Measured(
                "blocking_kept",
                f"{source}|{target}|{preset}",
                run.run_id,
                run.model_id,
                run.experiment,
                kept / n if n else None,
                n,
                None if interval is None else interval[0],
                None if interval is None else interval[1],
                "share",
                {"kept": kept, "layer_start": start, "layer_end": end},
                run.config,
            )
        )
    return out


# -- everything ----------------------------------------------------------------------------------

_BY_EXPERIMENT = {"ablation": ablation_measures, "blocking": blocking_measures}  # lens: lens_measures


def headline_measures(db: ResultsDB, objects: ObjectCellSource, hit_rule: str = "word") -> list[Measured]:
    """Every headline quantity on every run of the database, runs by start time; lens hits
    counted by `hit_rule` on the object cells of `objects`."""
    out: list[Measured] = []
    for run in queries.runs(db):
        if run.experiment == "lens":
            out += lens_measures(db, run, objects, hit_rule)
            continue
        measure = _BY_EXPERIMENT.get(run.experiment)
        if measure is not None:
            out += measure(db, run)
    return out
