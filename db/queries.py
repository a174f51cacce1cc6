"""The read API of a results database: every query the report runs, returning records.

The report (and anything else that only reads results) calls these functions instead of
writing SQL, so the table and column names live here and in db/schema.py only. Every
function takes an open `ResultsDB`; none writes to it (the two `export_*` functions
write files outside the database). Torch-free.

Why one ~670-line module: it is the whole read API, one function per question the report
asks, so that every SQL statement the site depends on is found (and reviewed against the
schema) in one place; the functions share no state.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from db.geometry import ViewGeometry
from db.store import ResultsDB
from db.views import HIT_RULES, NORMALISED_TOKEN


def _records(db: ResultsDB, query: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """Rows as dicts keyed by the query's column names."""
    with db.transaction() as conn:
        result = conn.exec_driver_sql(query, tuple(params))
        keys = list(result.keys())
        return [dict(zip(keys, row)) for row in result.fetchall()]


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# -- runs ------------------------------------------------------------------------------


def parse_config(value: Any) -> dict[str, Any]:
    """A run's config as a dict (DuckDB returns JSON as text; non-objects are wrapped)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {"config": value}
    return dict(value) if isinstance(value, dict) else {"config": value}


@dataclass(frozen=True)
class RunRecord:
    """One row of `runs`, config parsed."""

    run_id: str
    experiment: str
    model_id: str
    config: dict[str, Any]
    status: str
    started_at: Any
    finished_at: Any
    tool_version: str

    @property
    def top_k(self) -> int | None:
        """The lens top-k the run was asked for (config key `top_k`); None when absent."""
        value = self.config.get("top_k")
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def runs(db: ResultsDB, experiment: str | None = None) -> list[RunRecord]:
    """Every run (of one experiment), by start time then id."""
    return [
        RunRecord(
            run_id=row["run_id"],
            experiment=row["experiment"],
            model_id=row["model_id"],
            config=parse_config(row["config"]),
            status=row["status"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            tool_version=row["tool_version"],
        )
        for row in db.runs(experiment)
    ]


def run(db: ResultsDB, run_id: str) -> RunRecord | None:
    return next((record for record in runs(db) if record.run_id == run_id), None)


def image_counts(db: ResultsDB) -> dict[str, int]:
    """Per run, its images with a completion marker (skipped ones included)."""
    return dict(db.sql("SELECT run_id, count(*) FROM run_images GROUP BY run_id"))


def skipped_image_counts(db: ResultsDB) -> dict[str, int]:
    return dict(db.sql("SELECT run_id, count(DISTINCT image_id) FROM skipped GROUP BY run_id"))


def skipped(db: ResultsDB, run_id: str) -> list[dict[str, Any]]:
    """image_id, reason, detail of every skipped image of a run, by image and reason."""
    return _records(
        db, "SELECT image_id, reason, detail FROM skipped WHERE run_id = ? ORDER BY image_id, reason", [run_id]
    )


def schema_version(db: ResultsDB) -> int | None:
    rows = db.sql("SELECT max(version) FROM schema_migrations")
    return rows[0][0] if rows else None


# -- images, annotations, views ----------------------------------------------------------


def categories_by_image(db: ResultsDB) -> dict[int, list[str]]:
    """The distinct annotated categories of every image, sorted."""
    out: dict[int, list[str]] = {}
    for image_id, category in db.sql("SELECT DISTINCT image_id, category FROM annotations ORDER BY image_id, category"):
        out.setdefault(int(image_id), []).append(category)
    return out


def annotations_by_image(db: ResultsDB) -> dict[int, list[dict[str, Any]]]:
    """Per image, its annotations (annotation_id, category, bbox, iscrowd, segmentation) by id."""
    out: dict[int, list[dict[str, Any]]] = {}
    for image_id, annotation_id, category, bbox, iscrowd, segmentation in db.sql(
        "SELECT image_id, annotation_id, category, bbox, iscrowd, segmentation FROM annotations "
        "ORDER BY image_id, annotation_id"
    ):
        out.setdefault(int(image_id), []).append(
            {
                "annotation_id": int(annotation_id),
                "category": category,
                "bbox": bbox,
                "iscrowd": bool(iscrowd),
                "segmentation": segmentation,
            }
        )
    return out


def most_annotated_category(db: ResultsDB) -> str | None:
    """The lowercased category with the most annotations (ties: alphabetical), if any."""
    rows = db.sql(
        "SELECT lower(category) FROM annotations WHERE category IS NOT NULL AND category <> '' "
        "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
    )
    return rows[0][0] if rows else None


def view_geometries(db: ResultsDB) -> dict[tuple[str, int], ViewGeometry]:
    """The original -> view geometry of every (run, image) with a recorded view."""
    rows = db.sql(
        "SELECT v.run_id, v.image_id, i.width, i.height, v.view_width, v.view_height, "
        "v.scale_x, v.scale_y, v.offset_x, v.offset_y FROM image_views v JOIN images i USING (image_id)"
    )
    return {
        (run_id, int(image_id)): ViewGeometry(
            int(w), int(h), int(vw), int(vh), float(sx), float(sy), float(ox), float(oy)
        )
        for run_id, image_id, w, h, vw, vh, sx, sy, ox, oy in rows
    }


def view_sizes(db: ResultsDB, run_id: str) -> dict[int, tuple[int, int]]:
    """(view_width, view_height) of every image of a run with a recorded view."""
    return {
        int(image_id): (int(width), int(height))
        for image_id, width, height in db.sql(
            "SELECT image_id, view_width, view_height FROM image_views WHERE run_id = ?", (run_id,)
        )
    }


def view_size(db: ResultsDB, run_id: str, image_id: int) -> tuple[int, int] | None:
    """(view_width, view_height) of one image's recorded view, if any."""
    rows = db.sql(
        "SELECT view_width, view_height FROM image_views WHERE run_id = ? AND image_id = ?", (run_id, image_id)
    )
    return (int(rows[0][0]), int(rows[0][1])) if rows else None


@dataclass(frozen=True)
class ExtraView:
    """One row of `extra_views` without its PNG."""

    name: str
    kind: str
    width: int
    height: int
    grid_rows: int
    grid_cols: int


def extra_views(db: ResultsDB, run_id: str, image_id: int) -> list[ExtraView]:
    """The extra views of an image by name; none where the database predates the table."""
    if "extra_views" not in relations(db):
        return []
    return [
        ExtraView(name, kind, int(width), int(height), int(grid_rows), int(grid_cols))
        for name, kind, width, height, grid_rows, grid_cols in db.sql(
            "SELECT name, kind, view_width, view_height, grid_rows, grid_cols FROM extra_views "
            "WHERE run_id = ? AND image_id = ? ORDER BY name",
            (run_id, image_id),
        )
    ]


# Rows per query when reading pictures (PICTURE_TABLES) of many images. DuckDB scans rows
# 2,048 at a time and materialises every PNG of those rows, outside its buffer pool, even
# for one row: one image's PNG costs as much time and memory as the whole vector's (~0.37 s
# and ~460 MB for 336-pixel photos). Reading many images per query pays that once for
# them; a rowid range keeps the result to the rows asked for (128 photos: ~29 MB).
PICTURE_SPAN = 128
PICTURE_TABLES = ("image_views", "extra_views")


def pictures(db: ResultsDB, table: str, run_id: str, image_ids: list[int]) -> dict[tuple[int, str], bytes]:
    """The PNGs of those images of a run in `table` (image_views: key (image_id, ""),
    extra_views: (image_id, name)), read in rowid ranges of at most PICTURE_SPAN rows: a
    batch of consecutive images costs a few queries, not one per image."""
    if table not in PICTURE_TABLES:
        raise ValueError(f"no pictures in {table!r}")
    if table not in relations(db) or not image_ids:
        return {}
    name = "name" if table == "extra_views" else "''"
    located = {
        int(rowid): (int(image_id), str(key))
        for rowid, image_id, key in db.sql(
            f"SELECT rowid, image_id, {name} FROM {table} WHERE run_id = ? AND list_contains(?::BIGINT[], image_id)",
            (run_id, [int(i) for i in image_ids]),
        )
    }
    out: dict[tuple[int, str], bytes] = {}
    wanted = set(located.values())
    rowids = sorted(located)
    while rowids:
        first = rowids[0]
        span = [r for r in rowids if r < first + PICTURE_SPAN]
        rowids = rowids[len(span) :]
        # A constant rowid range bounds the scan itself (a parameter would not), as long as
        # rowid is not also read: then every row of the vector is fetched.
        for run, image_id, key, png in db.sql(
            f"SELECT run_id, image_id, {name}, png FROM {table} WHERE rowid BETWEEN {first} AND {span[-1]}"
        ):
            if run == run_id and (int(image_id), str(key)) in wanted:
                out[(int(image_id), str(key))] = bytes(png)
    return out


def image_pictures(db: ResultsDB, run_id: str, image_ids: list[int]) -> dict[tuple[str, int, str], bytes]:
    """(table, image_id, name) -> PNG of every view and extra view of those images of a run
    (`pictures` of each PICTURE_TABLES table; name "" for image_views)."""
    return {
        (table, image_id, name): png
        for table in PICTURE_TABLES
        for (image_id, name), png in pictures(db, table, run_id, image_ids).items()
    }


# -- completely written images and their lens rows ---------------------------------------


@dataclass(frozen=True)
class ImageMarker:
    """An image's `run_images` row: what the writer said it wrote."""

    n_positions: int
    n_layers: int | None
    grid_rows: int | None
    grid_cols: int | None


def image_marker(db: ResultsDB, run_id: str, image_id: int) -> ImageMarker | None:
    rows = db.sql(
        "SELECT n_positions, n_layers, grid_rows, grid_cols FROM run_images WHERE run_id = ? AND image_id = ?",
        (run_id, image_id),
    )
    return ImageMarker(*rows[0]) if rows else None


def image_grids(db: ResultsDB, run_id: str) -> dict[int, tuple[int | None, int | None]]:
    """(grid_rows, grid_cols) of every image of a run with a completion marker."""
    return {
        int(image_id): (rows, cols)
        for image_id, rows, cols in db.sql(
            "SELECT image_id, grid_rows, grid_cols FROM run_images WHERE run_id = ?", [run_id]
        )
    }


@dataclass(frozen=True)
class LensImage:
    """A completely written, not skipped image of a run of one experiment."""

    run_id: str
    image_id: int
    file_name: str
    width: int | None
    height: int | None
    has_view: bool
    view_width: int | None
    view_height: int | None


def written_images(db: ResultsDB, experiment: str) -> list[LensImage]:
    """Every completely written (run, image) of the experiment's runs, by run start then id."""
    rows = db.sql(
        """
        SELECT ri.run_id, ri.image_id, i.file_name, i.width, i.height,
               v.image_id IS NOT NULL AS has_view, v.view_width, v.view_height
        FROM run_images ri
        JOIN runs r USING (run_id)
        LEFT JOIN images i USING (image_id)
        LEFT JOIN image_views v ON v.run_id = ri.run_id AND v.image_id = ri.image_id
        WHERE r.experiment = ?
          -- A skipped image carries its marker (so a rerun does not retry it) but no rows.
          AND NOT EXISTS (
              SELECT 1 FROM skipped s WHERE s.run_id = ri.run_id AND s.image_id = ri.image_id
          )
        ORDER BY r.started_at, ri.run_id, ri.image_id
        """,
        [experiment],
    )
    return [
        LensImage(run_id, int(image_id), file_name or "", width, height, bool(has_view), view_width, view_height)
        for run_id, image_id, file_name, width, height, has_view, view_width, view_height in rows
    ]


@dataclass(frozen=True)
class Position:
    """One row of `positions` (an LM input position)."""

    position: int
    kind: str
    patch_row: int | None
    patch_col: int | None
    label: str


def positions(db: ResultsDB, run_id: str, image_id: int) -> list[Position]:
    """Every position of an image, in LM input order."""
    return [
        Position(*row)
        for row in db.sql(
            "SELECT position, kind, patch_row, patch_col, label FROM positions "
            "WHERE run_id = ? AND image_id = ? ORDER BY position",
            (run_id, image_id),
        )
    ]


POSITION_BATCH = 256  # images whose positions are read at once (not the whole run's, ~600 rows/image)


def positions_by_image(
    db: ResultsDB,
    run_id: str,
    *,
    kind: str | None = None,
    images_of: str | None = None,
    image_ids: list[int] | None = None,
) -> dict[int, dict[int, Position]]:
    """Per image, its positions by number; `kind` keeps one kind, `images_of` ('ablations'
    or 'blocking') keeps the images with rows in that table, `image_ids` those images."""
    query = "SELECT image_id, position, kind, patch_row, patch_col, label FROM positions WHERE run_id = ?"
    params: list[Any] = [run_id]
    if image_ids is not None:
        query += " AND list_contains(?::BIGINT[], image_id)"
        params.append([int(i) for i in image_ids])
    if kind is not None:
        query += " AND kind = ?"
        params.append(kind)
    if images_of is not None:
        if images_of not in ("ablations", "blocking"):
            raise ValueError(f"unknown results table {images_of!r}")
        query += f" AND image_id IN (SELECT image_id FROM {images_of} WHERE run_id = ?)"
        params.append(run_id)
    out: dict[int, dict[int, Position]] = {}
    for image_id, *row in db.sql(query, params):
        out.setdefault(int(image_id), {})[int(row[0])] = Position(*row)
    return out


def lens_rows(db: ResultsDB, run_id: str, image_id: int) -> pa.Table:
    """The image's logit-lens rows (layer, position, rank, token, prob) as Arrow, unordered."""
    return db.duck.sql(
        "SELECT layer, position, rank, token, prob FROM logit_lens WHERE run_id = ? AND image_id = ?",
        params=[run_id, image_id],
    ).to_arrow_table()


def max_rank(db: ResultsDB, run_id: str) -> int:
    """The deepest rank stored for a run (0 without lens rows)."""
    return int(db.sql("SELECT coalesce(max(rank), 0) FROM logit_lens WHERE run_id = ?", (run_id,))[0][0])


def runs_with_class_tokens(db: ResultsDB) -> set[str]:
    """Runs with `class_tokens` rows (the lens collector writes them since schema 8)."""
    if "class_tokens" not in relations(db):
        return set()
    return {str(r[0]) for r in db.sql("SELECT DISTINCT run_id FROM class_tokens")}


def object_hit_counts(
    db: ResultsDB, run_id: str, object_positions: pa.Table, hit_rule: str = "word"
) -> list[tuple[int, str, int, int, int]]:
    """(image_id, category, layer, top-1 hits, top-k hits) over the given object positions.

    `object_positions` has columns image_id, category, position: the positions of each
    (image, category) to count. The hit rule is db.views.OBJECT_HITS_SELECT's (also the view
    `lens_object_hits`), run here so databases created before the view work too, and run
    only on the lens rows of those positions, normalising each distinct token once (not
    once per row: a paper-scale run has ~10^8 rows and ~10^4 distinct tokens).
    `hit_rule` "first_token" counts instead the cells whose token id is the category's first
    token in the run's tokenizer (table `class_tokens`, rule 'first_token' of the view).
    """
    return [
        (int(i), c, int(layer), int(n1), int(nk))
        for i, c, layer, n1, nk in _object_hits(db, run_id, object_positions, hit_rule, "counts")
    ]


def object_first_top1_layers(
    db: ResultsDB, run_id: str, object_positions: pa.Table, hit_rule: str = "word"
) -> dict[int, tuple[int, int]]:
    """image_id -> (object positions whose top-1 token names their object at some layer, sum
    of the first such layer over them), over the given object positions (columns image_id,
    category, position), with object_hit_counts' hit rule and its one normalisation per
    distinct token."""
    return {int(i): (int(n), int(s)) for i, n, s in _object_hits(db, run_id, object_positions, hit_rule, "first_top1")}


# What object_hit_counts ("counts") and object_first_top1_layers ("first_top1") compute
# from the CTEs `o` (the object positions) and `hits` (see _object_hits).
_HIT_FINALS = {
    "counts": """
        SELECT h.image_id, h.category, h.layer,
               count(*) FILTER (WHERE h.best_rank = 1) AS top1, count(*) AS topk
        FROM hits h
        JOIN o ON o.image_id = h.image_id AND o.category = h.category AND o.position = h.position
        GROUP BY ALL""",
    "first_top1": """,
        first AS (
            SELECT h.image_id, h.category, h.position, min(h.layer) AS first_layer
            FROM hits h
            JOIN o ON o.image_id = h.image_id AND o.category = h.category AND o.position = h.position
            WHERE h.best_rank = 1
            GROUP BY ALL
        )
        SELECT image_id, count(*), sum(first_layer) FROM first GROUP BY image_id""",
}
# Per read-only database: (run, hit rule, object positions, {final: rows}) of the answers
# computed with another final's scan and not asked for yet. The quantitative and
# Reproduction pages ask for the same object positions of a run, so a build scans the
# lens rows for them once; an answer is dropped once given.
_PENDING_HITS: weakref.WeakKeyDictionary[ResultsDB, list[tuple[str, str, pa.Table, dict[str, list[tuple]]]]] = (
    weakref.WeakKeyDictionary()
)


def _object_hits(db: ResultsDB, run_id: str, object_positions: pa.Table, hit_rule: str, final: str) -> list[tuple]:
    """Rows of _HIT_FINALS[final], a query (or further CTEs then a query) over the CTEs `o`
    (the object positions) and `hits` (image_id, layer, position, category, best_rank: the
    best rank at which a cell of an object position names its object under `hit_rule`).
    On a read-only connection one scan answers every final: the others are kept for the
    next call with the same run, hit rule and set of object positions."""
    if hit_rule not in HIT_RULES:
        raise ValueError(f"unknown lens hit rule {hit_rule!r} (one of {', '.join(HIT_RULES)})")
    # The columns' types as in the lens table (a BIGINT position would make the join cast
    # every lens row, and the build's memory limit was not enough for that plan).
    wanted = (
        object_positions.select(["image_id", "category", "position"])
        .cast(pa.schema([("image_id", pa.int64()), ("category", pa.string()), ("position", pa.int32())]))
        .group_by(["image_id", "category", "position"])
        .aggregate([])
        .sort_by([("image_id", "ascending"), ("category", "ascending"), ("position", "ascending")])
    )
    pending = _PENDING_HITS.setdefault(db, []) if db.read_only else []
    for at, (run, rule, positions, answers) in enumerate(pending):
        if run == run_id and rule == hit_rule and final in answers and positions.equals(wanted):
            rows = answers.pop(final)
            if not answers:
                del pending[at]
            return rows
    duck = db.duck.cursor()
    try:
        duck.register("_object_positions", wanted)
        duck.register("_object_hits", _object_hits_rows(duck, run_id, hit_rule))
        answers = {}
        for name in [final, *(n for n in _HIT_FINALS if n != final and db.read_only)]:
            duck.execute(
                f"WITH o AS (SELECT * FROM _object_positions), hits AS (SELECT * FROM _object_hits){_HIT_FINALS[name]}"
            )
            answers[name] = duck.fetchall()
    finally:
        duck.close()
    rows = answers.pop(final)
    if answers:
        pending.append((run_id, hit_rule, wanted, answers))
    return rows


def _object_hits_rows(duck: duckdb.DuckDBPyConnection, run_id: str, hit_rule: str) -> pa.Table:
    """The `hits` rows (see _object_hits) of the object positions registered as `_object_positions`."""
    if hit_rule == "first_token":
        matched = """
            hits AS (
                SELECT c.image_id, c.layer, c.position, k.category, min(c.rank) AS best_rank
                FROM cells c
                JOIN class_tokens k ON k.run_id = ? AND k.image_id = c.image_id AND k.token_id = c.token_id
                GROUP BY c.image_id, c.layer, c.position, k.category
            )"""
        params = [run_id, run_id, run_id]
    else:
        matched = f"""
            norm AS (
                SELECT token, {NORMALISED_TOKEN.replace("l.token", "token")} AS t FROM (SELECT DISTINCT token FROM cells)
            ),
            hits AS (
                SELECT c.image_id, c.layer, c.position, a.category, min(c.rank) AS best_rank
                FROM cells c
                JOIN norm n ON n.token = c.token
                JOIN cats a ON a.image_id = c.image_id
                WHERE n.t <> ''
                  AND (n.t = a.name OR n.t = a.joined OR list_contains(string_split(a.name, ' '), n.t))
                GROUP BY c.image_id, c.layer, c.position, a.category
            )"""
        params = [run_id, run_id]
    return duck.sql(
        f"""
        WITH o AS (SELECT DISTINCT image_id, category, position FROM _object_positions),
        op AS (SELECT DISTINCT image_id, position FROM o),
        cats AS (
            SELECT DISTINCT image_id, category, lower(category) AS name,
                   replace(lower(category), ' ', '') AS joined
            FROM annotations WHERE image_id IN (SELECT image_id FROM op)
        ),
        cells AS (
            SELECT l.image_id, l.layer, l.position, l.rank, l.token, l.token_id
            FROM logit_lens l
            JOIN op ON op.image_id = l.image_id AND op.position = l.position
            JOIN positions p ON p.run_id = l.run_id AND p.image_id = l.image_id AND p.position = l.position
            WHERE l.run_id = ? AND p.run_id = ? AND p.kind = 'image'
        ),{matched}
        SELECT * FROM hits
        """,
        params=params,
    ).to_arrow_table()


# -- token ablation ----------------------------------------------------------------------


def ablation_summary(db: ResultsDB, run_id: str) -> list[dict[str, Any]]:
    """The `ablation_summary` view's rows of a run (unordered)."""
    return _records(
        db,
        "SELECT setting, condition, n_baseline_correct, n_flipped, pct_flipped, mean_tokens_ablated "
        "FROM ablation_summary WHERE run_id = ?",
        [run_id],
    )


def ablation_rows(db: ResultsDB, run_id: str) -> list[dict[str, Any]]:
    """Every `ablations` row of a run with the image's file name, by image."""
    return _records(
        db,
        "SELECT a.image_id, i.file_name, a.category, a.setting, a.condition, a.positions, a.n_ablated, a.correct, "
        "a.answer, a.question, a.predicted_token, a.predicted_prob, a.target_token, a.target_prob, a.seed "
        "FROM ablations a JOIN images i USING (image_id) WHERE a.run_id = ? ORDER BY a.image_id",
        [run_id],
    )


def ablation_baseline(db: ResultsDB, run_id: str) -> list[dict[str, Any]]:
    """Per setting, the images with a 'none' row (n_images) and how many it got right (n_correct)."""
    return _records(
        db,
        "SELECT setting, count(*) AS n_images, count(*) FILTER (WHERE correct) AS n_correct "
        "FROM ablations WHERE run_id = ? AND condition = 'none' GROUP BY setting",
        [run_id],
    )


# -- attention blocking ------------------------------------------------------------------


def blocking_curves(db: ResultsDB, run_id: str, window_kind: str) -> list[dict[str, Any]]:
    """The `blocking_curves` view's rows of one window kind ('sliding', 'preset', 'baseline'),
    by target, source, layer_start, layer_end."""
    return _records(
        db,
        "SELECT target, source, preset, layer_start, layer_end, n, accuracy, mean_target_prob, relative_accuracy "
        "FROM blocking_curves WHERE run_id = ? AND window_kind = ? ORDER BY target, source, layer_start, layer_end",
        [run_id, window_kind],
    )


def blocking_outcomes(db: ResultsDB, run_id: str, window_kind: str) -> list[tuple[Any, ...]]:
    """Per image and blocking condition of one window kind: (target, source, layer_start,
    layer_end, image_id, correct, target_prob, baseline_correct), by condition then image.

    The rows the `blocking_curves` view aggregates (images with a baseline row only), for
    intervals by bootstrap over images; one row per image x condition, never per position.
    """
    return [
        tuple(row)
        for row in db.sql(
            """
            SELECT b.target, b.source, b.layer_start, b.layer_end, b.image_id, b.correct, b.target_prob,
                   base.correct AS baseline_correct
            FROM blocking b
            JOIN (SELECT run_id, image_id, correct FROM blocking WHERE window_kind = 'baseline') base
              USING (run_id, image_id)
            WHERE b.run_id = ? AND b.window_kind = ?
            ORDER BY b.target, b.source, b.layer_start, b.layer_end, b.image_id
            """,
            (run_id, window_kind),
        )
    ]


def run_layer_count(db: ResultsDB, run_id: str) -> int | None:
    """The largest `run_images.n_layers` of a run: hidden states for a lens run (embeddings
    + one per decoder layer), decoder layers for ablation and blocking runs; None if unknown."""
    rows = db.sql("SELECT max(n_layers) FROM run_images WHERE run_id = ?", (run_id,))
    return int(rows[0][0]) if rows and rows[0][0] is not None else None


def blocking_image_summary(db: ResultsDB, run_id: str) -> list[dict[str, Any]]:
    """Per image with a marker: category, question, baseline prediction, share of blocking
    conditions still correct, and why it was skipped (if it was)."""
    return _records(
        db,
        """
        SELECT ri.image_id, i.file_name,
               max(b.category) AS category,
               max(b.question) AS question,
               bool_or(b.correct) FILTER (WHERE b.window_kind = 'baseline') AS baseline_correct,
               max(b.predicted_token) FILTER (WHERE b.window_kind = 'baseline') AS baseline_token,
               max(b.target_prob) FILTER (WHERE b.window_kind = 'baseline') AS baseline_target_prob,
               count(b.image_id) FILTER (WHERE b.window_kind <> 'baseline') AS n_conditions,
               avg(b.correct::DOUBLE) FILTER (WHERE b.window_kind <> 'baseline') AS share_correct,
               (SELECT string_agg(s.reason, ',') FROM skipped s
                 WHERE s.run_id = ri.run_id AND s.image_id = ri.image_id) AS skipped_reason
        FROM run_images ri
        LEFT JOIN images i USING (image_id)
        LEFT JOIN blocking b ON b.run_id = ri.run_id AND b.image_id = ri.image_id
        WHERE ri.run_id = ?
        GROUP BY ri.run_id, ri.image_id, i.file_name
        ORDER BY ri.image_id
        """,
        [run_id],
    )


def blocking_rows(db: ResultsDB, run_id: str) -> list[dict[str, Any]]:
    """Every `blocking` row of a run with the image's file name, by image."""
    return _records(
        db,
        "SELECT b.image_id, i.file_name, b.category, b.question, b.source, b.target, b.layer_start, b.layer_end, "
        "b.window_kind, b.preset, b.correct, b.predicted_token, b.predicted_prob, b.target_token, b.target_prob, "
        "b.source_positions, b.target_positions "
        "FROM blocking b LEFT JOIN images i USING (image_id) WHERE b.run_id = ? ORDER BY b.image_id",
        [run_id],
    )


# -- tables and exports ------------------------------------------------------------------


def relations(db: ResultsDB) -> set[str]:
    """Names of the tables and views of the database."""
    return {
        name
        for (name,) in db.sql(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_catalog = current_database()"
        )
    }


def table_columns(db: ResultsDB) -> dict[str, set[str]]:
    """The columns of every table and view."""
    columns: dict[str, set[str]] = {}
    for table, column in db.sql(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'main' AND table_catalog = current_database()"
    ):
        columns.setdefault(table, set()).add(column)
    return columns


def _table_name(table: str, db: ResultsDB) -> str:
    # Table names are spliced into SQL: accept only the database's own.
    if table not in relations(db):
        raise ValueError(f"no table {table!r}")
    return f'"{table}"'


def count_rows(db: ResultsDB, table: str, run_id: str | None = None) -> int:
    """Rows of a table (of one run)."""
    name = _table_name(table, db)
    if run_id is None:
        return int(db.sql(f"SELECT count(*) FROM {name}")[0][0])
    return int(db.sql(f"SELECT count(*) FROM {name} WHERE run_id = ?", (run_id,))[0][0])


def export_csv(
    db: ResultsDB,
    table: str,
    path: Path,
    *,
    run_id: str | None = None,
    exclude: tuple[str, ...] = (),
    where: str | None = None,
) -> None:
    """Write a table (one run's rows, without the `exclude` columns, only those matching the
    SQL condition `where`) as gzipped CSV with a header."""
    select = f"* EXCLUDE ({', '.join(exclude)})" if exclude else "*"
    query = f"SELECT {select} FROM {_table_name(table, db)}"
    conditions = [f"run_id = {_sql_literal(run_id)}"] if run_id is not None else []
    if where is not None:
        conditions.append(f"({where})")
    if conditions:
        query += " WHERE " + " AND ".join(conditions)
    db.duck.execute(f"COPY ({query}) TO {_sql_literal(str(path))} (HEADER, DELIMITER ',', COMPRESSION gzip)")


def image_row_counts(db: ResultsDB, table: str, run_id: str) -> list[tuple[int, int]]:
    """(image_id, rows) of one run's rows of a table with an image_id column, by image."""
    name = _table_name(table, db)
    return [
        (int(i), int(n))
        for i, n in db.sql(
            f"SELECT image_id, count(*) FROM {name} WHERE run_id = ? GROUP BY image_id ORDER BY image_id", (run_id,)
        )
    ]


# A sort key of export_parquet: a column, or `column // N`.
_SORT_KEY = re.compile(r"(\w+)(?: // (\d+))?")


def export_parquet(
    db: ResultsDB,
    table: str,
    path: Path,
    *,
    run_id: str | None = None,
    image_range: tuple[int, int] | None = None,
    exclude: tuple[str, ...] = (),
    order_by: tuple[str, ...] = (),
    row_group_size: int = 122_880,
    select: str | None = None,
    where: str | None = None,
    compression_level: int | None = None,
    dictionaries: bool = True,
) -> int:
    """Write a table (one run's rows, optionally only image_id in [lo, hi] and only rows
    matching the SQL condition `where`, without the
    `exclude` columns, or the SQL select list `select`) as one zstd Parquet file, sorted by
    `order_by` so row-group min/max statistics prune. Each sort key is a column name or
    `column // N` (N a positive integer: bands of N consecutive values, see
    report/downloads.py's lens order). Text columns are dictionary-encoded unless
    `dictionaries` is False, which turns dictionary encoding off for every column (then
    integers are delta-encoded: the better choice for a column of numbers that repeat in
    runs, not for text). `compression_level`: zstd's level (DuckDB's default, 3, when None).
    Returns the rows written."""
    if select is None:
        select = f"* EXCLUDE ({', '.join(exclude)})" if exclude else "*"
    query = f"SELECT {select} FROM {_table_name(table, db)}"
    conditions = []
    if run_id is not None:
        conditions.append(f"run_id = {_sql_literal(run_id)}")
    if image_range is not None:
        conditions.append(f"image_id BETWEEN {int(image_range[0])} AND {int(image_range[1])}")
    if where is not None:
        conditions.append(f"({where})")
    if conditions:
        query += " WHERE " + " AND ".join(conditions)
    columns = table_columns(db)[table]
    keys = []
    for key in order_by:
        match = _SORT_KEY.fullmatch(key)
        if match is None or match.group(1) not in columns or (match.group(2) is not None and int(match.group(2)) < 1):
            raise ValueError(f"sort key {key!r} is not a column of {table!r} or `column // N`")
        column, band = match.groups()
        keys.append(f'"{column}"' if band is None else f'"{column}" // {int(band)}')
    if keys:
        query += " ORDER BY " + ", ".join(keys)
    options = f"ROW_GROUP_SIZE {int(row_group_size)}, PARQUET_VERSION v2"
    if compression_level is not None:
        options += f", COMPRESSION_LEVEL {int(compression_level)}"
    if not dictionaries:
        options += ", DICTIONARY_SIZE_LIMIT 1"
    rows = db.duck.execute(
        f"COPY ({query}) TO {_sql_literal(str(path))} (FORMAT parquet, COMPRESSION zstd, {options})"
    ).fetchall()
    return int(rows[0][0]) if rows and rows[0] else 0


def ordered_columns(db: ResultsDB, table: str) -> list[tuple[str, str]]:
    """(name, type) of the columns of a table, in their declared order."""
    return [
        (row[0], row[1])
        for row in db.sql(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
            "AND table_catalog = current_database() AND table_schema = 'main' ORDER BY ordinal_position",
            (table,),
        )
    ]


def export_lens_tokens(db: ResultsDB, path: Path, run_id: str) -> tuple[int, bool]:
    """The distinct (run_id, token_id, token) pairs of a run's logit-lens rows as one Parquet
    file, by token id. Returns (rows, whether each token id has exactly one text and none
    is NULL, so the pairs can stand in for the lens rows' token column)."""
    db.duck.execute(
        f"COPY (SELECT DISTINCT run_id, token_id, token FROM logit_lens WHERE run_id = {_sql_literal(run_id)} "
        f"ORDER BY token_id, token) TO {_sql_literal(str(path))} (FORMAT parquet, COMPRESSION zstd, "
        "PARQUET_VERSION v2)"
    )
    rows, usable = _lens_tokens_check(db, path)
    return rows, usable


_ROW_DIGESTS: weakref.WeakKeyDictionary[ResultsDB, dict[tuple[Any, ...], list[tuple[int, int, int, int]]]] = (
    weakref.WeakKeyDictionary()
)


def _hash_columns(columns: Iterable[str]) -> str:
    return "hash(" + ", ".join(f'"{c}"' for c in columns) + ")"


def image_row_digests(
    db: ResultsDB,
    table: str,
    run_id: str,
    columns: list[str],
    token: tuple[str, str] | None = None,
    where: str | None = None,
) -> list[tuple[int, int, int, int]]:
    """(image_id, rows, sum of the rows' hashes over `columns`, sum of hash(token columns) or 0)
    of one run's rows of a table with an image_id column, by image: what a file of an image
    range holds, to tell whether an exported file is still current (report/downloads.py).
    A sum, not a xor, so that two equal rows do not cancel. On a read-only connection (nothing
    can write the file meanwhile) the answer is remembered: the build's lens page digests and
    its downloads read the lens rows' digests once. `where`: only the rows matching this SQL
    condition."""
    key = (table, run_id, tuple(columns), token, where)
    memo = _ROW_DIGESTS.setdefault(db, {}) if db.read_only else {}
    if key not in memo:
        name = _table_name(table, db)
        tokens = f"sum({_hash_columns(token)}::HUGEINT)" if token else "0"
        query = (
            f"SELECT image_id, count(*), sum({_hash_columns(columns)}::HUGEINT), {tokens} FROM {name} "
            f"WHERE run_id = ? {'' if where is None else f'AND ({where}) '}"
        )
        by_image: dict[int, tuple[int, int, int]] = {}
        for condition in _row_batches(db, table, columns):  # an image's rows may span batches
            for i, n, h, t in db.sql(f"{query}{condition}GROUP BY image_id", (run_id,)):
                before = by_image.get(int(i), (0, 0, 0))
                by_image[int(i)] = (before[0] + int(n), before[1] + int(h or 0), before[2] + int(t or 0))
        memo[key] = [(i, *by_image[i]) for i in sorted(by_image)]
    return memo[key]


# Rows per query when a hashed column is a BLOB (the views' PNGs): DuckDB scans 2,048 rows
# at a time, and 2,048 photos of ~225 KB (~1 MB for a 672-pixel view) are more than the
# report build's DuckDB memory limit. A rowid range limits the scan itself; a filter on
# image_id does not when image_id is also read (then every row of the vector is fetched).
BLOB_ROW_BATCH = 64


def _row_batches(db: ResultsDB, table: str, columns: list[str]) -> list[str]:
    """ "AND rowid BETWEEN first AND last" per BLOB_ROW_BATCH rows when a column of
    `columns` is a BLOB, else [""]: the conditions that split a hash over `columns` into
    queries that fit in memory."""
    types = dict(ordered_columns(db, table))
    if not any(types.get(c) == "BLOB" for c in columns):
        return [""]
    ((last,),) = db.sql(f"SELECT coalesce(max(rowid), -1) FROM {_table_name(table, db)}")
    return [f"AND rowid BETWEEN {at} AND {at + BLOB_ROW_BATCH - 1} " for at in range(0, int(last) + 1, BLOB_ROW_BATCH)]


def row_digest(db: ResultsDB, table: str, columns: list[str], run_id: str | None = None) -> tuple[int, int]:
    """(rows, sum of the rows' hashes over `columns`) of a table (of one run), in batches of
    rows where a column is a BLOB (_row_batches)."""
    query = f"SELECT count(*), sum({_hash_columns(columns)}::HUGEINT) FROM {_table_name(table, db)} WHERE true "
    rows, hashed = 0, 0
    for condition in _row_batches(db, table, columns):
        run_filter = "" if run_id is None else "AND run_id = ? "
        ((n, h),) = db.sql(query + run_filter + condition, () if run_id is None else (run_id,))
        rows, hashed = rows + int(n), hashed + int(h or 0)
    return rows, hashed


def schema_statements(db: ResultsDB) -> list[str]:
    """The SQL of every table, view, index, sequence and macro of the database (a database
    copy's inputs beside the rows)."""
    current = "database_name = current_database() AND NOT internal"
    return [
        str(sql)
        for (sql,) in db.sql(
            f"SELECT sql FROM duckdb_tables() WHERE {current} UNION ALL "
            f"SELECT sql FROM duckdb_views() WHERE {current} UNION ALL "
            f"SELECT sql FROM duckdb_indexes() WHERE database_name = current_database() UNION ALL "
            "SELECT sql || ' -- ' || coalesce(CAST(last_value AS VARCHAR), '') FROM duckdb_sequences() "
            "WHERE database_name = current_database() UNION ALL "
            f"SELECT macro_definition FROM duckdb_functions() WHERE {current} AND macro_definition IS NOT NULL "
            "ORDER BY 1"
        )
        if sql is not None
    ]


def lens_tokens_from_pieces(db: ResultsDB, run_id: str) -> list[int] | None:
    """The token ids of a run's logit-lens rows when every row's token_id has a
    `token_pieces` row of the run whose text is the row's token (compared by 64-bit hash:
    a row with another text passes only on a hash collision) and no row's token or
    token_id is NULL; None otherwise (or without token_pieces rows)."""
    if "token_pieces" not in relations(db):
        return None
    rows = db.sql(
        "WITH used AS (SELECT token_id, min(hash(token)) AS lo, max(hash(token)) AS hi, count(token) AS texts, "
        "count(*) AS n FROM logit_lens WHERE run_id = ? GROUP BY token_id) "
        "SELECT used.token_id, p.token_id IS NOT NULL AND used.token_id IS NOT NULL AND lo = hi AND texts = n "
        "AND lo = hash(p.text) FROM used LEFT JOIN (SELECT token_id, text FROM token_pieces WHERE run_id = ?) p "
        "ON p.token_id = used.token_id ORDER BY 1",
        (run_id, run_id),
    )
    if not rows or not all(ok for _, ok in rows):
        return None
    return [int(token_id) for token_id, _ in rows]


def export_token_pieces_as_lens_tokens(
    db: ResultsDB, path: Path, run_id: str, token_ids: list[int]
) -> tuple[int, bool]:
    """The (run_id, token_id, text AS token) rows of the run's `token_pieces` for `token_ids`
    (`lens_tokens_from_pieces`) as one Parquet file by token id, the same file as
    `export_lens_tokens` writes when the lens rows agree with token_pieces. Returns (rows,
    whether each id has exactly one row)."""
    wanted = pa.table({"token_id": pa.array(token_ids, pa.int64())})
    view = "llava_interp_lens_token_ids"
    db.duck.register(view, wanted)
    try:
        db.duck.execute(
            f"COPY (SELECT p.run_id, p.token_id, p.text AS token FROM token_pieces p SEMI JOIN {view} w "
            f"ON w.token_id = p.token_id WHERE p.run_id = {_sql_literal(run_id)} ORDER BY p.token_id, p.text) "
            f"TO {_sql_literal(str(path))} (FORMAT parquet, COMPRESSION zstd, PARQUET_VERSION v2)"
        )
    finally:
        db.duck.unregister(view)
    return _lens_tokens_check(db, path, len(token_ids))


def _lens_tokens_check(db: ResultsDB, path: Path, expected: int | None = None) -> tuple[int, bool]:
    rows, ids, distinct = db.duck.execute(
        f"SELECT count(*), count(token_id), count(DISTINCT token_id) FROM read_parquet({_sql_literal(str(path))})"
    ).fetchall()[0]
    return int(rows), rows == ids == distinct and (expected is None or rows == expected)


def view_definitions(db: ResultsDB) -> list[tuple[str, str]]:
    """(name, CREATE VIEW statement) of the database's views, in creation order."""
    return [
        (name, sql)
        for name, sql in db.sql(
            "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal AND schema_name = 'main' "
            "AND database_name = current_database() ORDER BY view_oid"
        )
    ]


def export_database(db: ResultsDB, path: Path, storage_version: str) -> None:
    """Copy the whole database into a new file written with the given storage version."""
    alias = "llava_interp_site_copy"
    source = db.sql("SELECT current_database()")[0][0]
    db.duck.execute(
        f"ATTACH {_sql_literal(str(path))} AS {alias} "
        f"(STORAGE_VERSION {_sql_literal(storage_version)}, READ_ONLY false)"
    )
    try:
        db.duck.execute(f'COPY FROM DATABASE "{source}" TO {alias}')
    finally:
        db.duck.execute(f"DETACH {alias}")


def export_console_database(
    db: ResultsDB, path: Path, root: Path, parquet: dict[str, list[str]], storage_version: str
) -> None:
    """A small database of views only: each table a view over its Parquet files (paths
    relative to `root`, the site folder, as a browser resolves them against the site) and
    the database's own views on top, for the SQL console."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute(f"SET file_search_path = {_sql_literal(str(root))}")
        con.execute(f"ATTACH {_sql_literal(str(path))} AS console (STORAGE_VERSION {_sql_literal(storage_version)})")
        con.execute("USE console")
        for table, files in sorted(parquet.items()):
            listed = ", ".join(_sql_literal(f) for f in files)
            con.execute(f'CREATE VIEW "{table}" AS SELECT * FROM read_parquet([{listed}])')
        pending = [sql for name, sql in view_definitions(db) if name not in parquet]
        while pending:  # views on views: create in dependency order
            failed = []
            for sql in pending:
                try:
                    con.execute(sql)
                except duckdb.Error:
                    failed.append(sql)
            if len(failed) == len(pending):
                break  # a view over a table that is not published: left out
            pending = failed
        con.execute("USE memory")
        con.execute("DETACH console")
    finally:
        con.close()


# -- lens page additions (report/pages/lens.py, index.py, compare) ------------------------
# Added by the lens-page work; kept together at the end of the file.


def lens_rows_with_ids(db: ResultsDB, run_id: str, image_id: int, max_rank: int | None = None) -> pa.Table:
    """The image's logit-lens rows (layer, position, rank, token_id, token, prob) as Arrow,
    unordered; with `max_rank`, ranks 1..max_rank only."""
    return db.duck.sql(
        "SELECT layer, position, rank, token_id, token, prob FROM logit_lens WHERE run_id = ? AND image_id = ? "
        "AND rank <= ?",
        params=[run_id, image_id, _MAX_RANK if max_rank is None else int(max_rank)],
    ).to_arrow_table()


_MAX_RANK = 2**31 - 1  # every rank


def position_token_ids(db: ResultsDB, run_id: str, image_id: int) -> list[int | None]:
    """The input token id of every position of an image, in LM input order."""
    return [
        row[0]
        for row in db.sql(
            "SELECT token_id FROM positions WHERE run_id = ? AND image_id = ? ORDER BY position", (run_id, image_id)
        )
    ]


def token_pieces(db: ResultsDB, run_id: str, token_ids: Iterable[int]) -> dict[int, str]:
    """The tokenizer piece of each of `token_ids` the run recorded (`token_pieces`); ids
    without a row (runs written before schema 9) are absent."""
    ids = sorted({int(i) for i in token_ids})
    if not ids:
        return {}
    rows = db.duck.execute(
        "SELECT p.token_id, p.piece FROM token_pieces p "
        "JOIN (SELECT unnest(?::INTEGER[]) AS token_id) wanted USING (token_id) WHERE p.run_id = ?",
        [ids, run_id],
    ).fetchall()
    return {int(token_id): piece for token_id, piece in rows}


def lens_runs_of_image(db: ResultsDB, image_id: int) -> list[RunRecord]:
    """Every lens run with the image completely written (not skipped), by run start."""
    ids = {
        row[0]
        for row in db.sql(
            "SELECT ri.run_id FROM run_images ri JOIN runs r USING (run_id) WHERE r.experiment = 'lens' "
            "AND ri.image_id = ? AND NOT EXISTS (SELECT 1 FROM skipped s WHERE s.run_id = ri.run_id "
            "AND s.image_id = ri.image_id)",
            (image_id,),
        )
    }
    return [record for record in runs(db, "lens") if record.run_id in ids]


def last_position_top1(db: ResultsDB, run_id: str) -> dict[int, tuple[str, float, int]]:
    """Per image of a lens run: (token, prob, layer) of the last layer's top-1 at the last position."""
    rows = db.sql(
        """
        SELECT l.image_id, l.token, l.prob, l.layer FROM logit_lens l
        JOIN (SELECT image_id, max(position) AS position FROM positions WHERE run_id = ? GROUP BY image_id) p
          ON p.image_id = l.image_id AND p.position = l.position
        JOIN (SELECT image_id, n_layers FROM run_images WHERE run_id = ?) m ON m.image_id = l.image_id
        WHERE l.run_id = ? AND l.rank = 1 AND l.layer = m.n_layers - 1
        """,
        (run_id, run_id, run_id),
    )
    return {int(image_id): (token, float(prob), int(layer)) for image_id, token, prob, layer in rows}


@dataclass(frozen=True)
class LensImageFacts:
    """One image's lens rows in aggregate (what a lens page checks when it does not read
    the rows itself), and the last layer's top-1 at the image's last position."""

    rows: int
    min_layer: int
    max_layer: int
    min_rank: int
    max_rank: int
    min_position: int
    max_position: int
    next_token: str | None
    next_prob: float | None


def lens_image_facts(db: ResultsDB, run_id: str, max_rank: int | None = None) -> dict[int, LensImageFacts]:
    """image_id -> LensImageFacts of every image of a run's logit-lens rows (with `max_rank`,
    of ranks 1..max_rank only), in two scans."""
    bounds = db.sql(
        "SELECT image_id, count(*), min(layer), max(layer), min(rank), max(rank), min(position), max(position) "
        "FROM logit_lens WHERE run_id = ? AND rank <= ? GROUP BY image_id",
        (run_id, _MAX_RANK if max_rank is None else int(max_rank)),
    )
    last = {
        int(image_id): (token, prob)
        for image_id, token, prob in db.sql(
            "WITH p AS (SELECT image_id, max(position) AS position FROM positions WHERE run_id = ? GROUP BY image_id), "
            "l AS (SELECT image_id, max(layer) AS layer FROM logit_lens WHERE run_id = ? GROUP BY image_id) "
            "SELECT lens.image_id, lens.token, lens.prob FROM logit_lens lens JOIN p USING (image_id, position) "
            "JOIN l USING (image_id, layer) WHERE lens.run_id = ? AND lens.rank = 1",
            (run_id, run_id, run_id),
        )
    }
    out = {}
    for image_id, rows, min_layer, max_layer, min_rank, max_rank, min_position, max_position in bounds:
        token, prob = last.get(int(image_id), (None, None))
        out[int(image_id)] = LensImageFacts(
            int(rows), int(min_layer), int(max_layer), int(min_rank), int(max_rank), int(min_position),
            int(max_position), token, None if prob is None else float(prob),
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class LensPageInputs:
    """What a lens page reads about one image besides its lens rows (lens_page_inputs)."""

    marker: ImageMarker
    positions: list[Position]
    token_ids: list[int | None]  # each position's input token id, in position order
    view: tuple[int, int] | None
    extra_views: list[ExtraView]


def lens_page_inputs(db: ResultsDB, run_id: str, image_ids: list[int]) -> dict[int, LensPageInputs]:
    """image_id -> LensPageInputs for the completely written images among `image_ids`, in
    four queries (image_marker, positions, position_token_ids, view_size and extra_views
    image by image are one query each)."""
    ids = [int(i) for i in image_ids]
    markers = {
        int(row[0]): ImageMarker(*row[1:])
        for row in db.duck.execute(
            "SELECT image_id, n_positions, n_layers, grid_rows, grid_cols FROM run_images "
            "WHERE run_id = ? AND list_contains(?::BIGINT[], image_id)",
            [run_id, ids],
        ).fetchall()
    }
    positions: dict[int, list[Position]] = {i: [] for i in markers}
    token_ids: dict[int, list[int | None]] = {i: [] for i in markers}
    for image_id, position, kind, patch_row, patch_col, label, token_id in db.duck.execute(
        "SELECT image_id, position, kind, patch_row, patch_col, label, token_id FROM positions "
        "WHERE run_id = ? AND list_contains(?::BIGINT[], image_id) ORDER BY image_id, position",
        [run_id, ids],
    ).fetchall():
        if int(image_id) in positions:
            positions[int(image_id)].append(Position(position, kind, patch_row, patch_col, label))
            token_ids[int(image_id)].append(token_id)
    views = {
        int(image_id): (int(width), int(height))
        for image_id, width, height in db.duck.execute(
            "SELECT image_id, view_width, view_height FROM image_views "
            "WHERE run_id = ? AND list_contains(?::BIGINT[], image_id)",
            [run_id, ids],
        ).fetchall()
    }
    extra: dict[int, list[ExtraView]] = {}
    if "extra_views" in relations(db):
        for image_id, name, kind, width, height, grid_rows, grid_cols in db.duck.execute(
            "SELECT image_id, name, kind, view_width, view_height, grid_rows, grid_cols FROM extra_views "
            "WHERE run_id = ? AND list_contains(?::BIGINT[], image_id) ORDER BY image_id, name",
            [run_id, ids],
        ).fetchall():
            extra.setdefault(int(image_id), []).append(
                ExtraView(name, kind, int(width), int(height), int(grid_rows), int(grid_cols))
            )
    return {
        i: LensPageInputs(marker, positions[i], token_ids[i], views.get(i), extra.get(i, []))
        for i, marker in markers.items()
    }
