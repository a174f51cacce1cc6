"""The SQL console page (`sql.html`): DuckDB-WASM in the browser over the site's copy of
the database (`data/results.duckdb`, attached read-only), with example queries one click away.

The page needs http(s): browsers refuse module scripts, workers and fetch() on file://,
and it says so. Its JavaScript is templates/static/sql.js; the WASM files come from
report/duckdb_wasm.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from db import queries
from db.store import ResultsDB
from report import duckdb_wasm, urls
from report.site import Site

SERVE_COMMAND = "llava-interp report serve --dir site"
DEFAULT_ROW_LIMIT = 1000


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def examples(db: ResultsDB) -> list[dict[str, str]]:
    """Example queries one click away, for the tables and views this database has."""
    relations = queries.relations(db)
    out = [
        {
            "title": "Tables and views",
            "needs": "",
            "description": "Every table and view of this database.",
            "sql": "SELECT table_name, table_type\nFROM information_schema.tables\n"
            "WHERE table_catalog = 'results'\nORDER BY table_type, table_name;",
        },
        {
            "title": "Runs",
            "needs": "runs",
            "description": "Every run: experiment, model, status.",
            "sql": "SELECT run_id, experiment, model_id, status, started_at, finished_at\nFROM runs\n"
            "ORDER BY started_at;",
        },
        {
            "title": "Token ablation: flipped answers per setting",
            "needs": "ablation_summary",
            "description": "Paper §5: among images answered correctly with nothing ablated, the share "
            "whose answer flips under each ablation, per setting (view ablation_summary).",
            "sql": "SELECT run_id, setting, condition, n_baseline_correct, n_flipped,\n"
            "       round(pct_flipped, 1) AS pct_flipped, round(mean_tokens_ablated, 1) AS mean_tokens_ablated\n"
            "FROM ablation_summary\nORDER BY run_id, setting, pct_flipped DESC;",
        },
        {
            "title": "Attention blocking: object_1 \u2192 last, mid_late layers",
            "needs": "blocking_curves",
            "description": "Paper §6: accuracy relative to the unblocked baseline when the last position "
            "cannot attend to the object's patches (and their neighbours) in the mid-late layer window "
            "(view blocking_curves).",
            "sql": "SELECT run_id, source, target, preset, layer_start, layer_end, n,\n"
            "       round(accuracy, 3) AS accuracy, round(relative_accuracy, 3) AS relative_accuracy\n"
            "FROM blocking_curves\nWHERE window_kind = 'preset' AND preset = 'mid_late'\n"
            "  AND source = 'object_1' AND target = 'last'\nORDER BY run_id;",
        },
    ]
    # A token worth looking up: the most annotated category, else the README's 'cat'.
    token = queries.most_annotated_category(db) or "cat"
    out.append(
        {
            "title": f"Logit lens: where \u201c{token}\u201d is the top-1 token",
            "needs": "lens_top1",
            "description": "Per image, the first layer at which the token is the top-1 lens token at "
            "some image patch, and at how many patches (view lens_top1).",
            "sql": "SELECT run_id, image_id, min(layer) AS first_layer, count(*) AS patch_layers\n"
            f"FROM lens_top1\nWHERE kind = 'image' AND lower(trim(token)) = {_sql_string(token)}\n"
            "GROUP BY run_id, image_id\nORDER BY run_id, image_id;",
        }
    )
    out += [
        {
            "title": "Quantitative lens: object hits per layer",
            "needs": "lens_object_hits",
            "description": "Paper §4.1: per run and layer, the (patch, category) pairs whose lens tokens "
            "name an annotated object at rank 1 and within the top-k (view lens_object_hits).",
            "sql": "SELECT run_id, layer,\n       count(*) FILTER (WHERE best_rank = 1) AS top1_hits,\n"
            "       count(*) AS topk_hits\nFROM lens_object_hits\nGROUP BY run_id, layer\n"
            "ORDER BY run_id, layer;",
        },
        {
            "title": "Logit lens: top-k at the last position, middle layer",
            "needs": "run_images",
            "description": "The lens's top-k at the last input position in the middle layer of one image.",
            "sql": "WITH one AS (\n"
            "    SELECT ri.run_id, ri.image_id, ri.n_layers FROM run_images ri JOIN runs r USING (run_id)\n"
            "    WHERE r.experiment = 'lens' AND ri.n_layers IS NOT NULL\n"
            "    ORDER BY ri.run_id, ri.image_id LIMIT 1)\n"
            "SELECT l.run_id, l.image_id, l.layer, l.position, l.rank, l.token, round(l.prob, 4) AS prob\n"
            "FROM logit_lens l JOIN one USING (run_id, image_id)\n"
            "WHERE l.layer = one.n_layers // 2\n"
            "  AND l.position = (SELECT max(position) FROM positions p\n"
            "                    WHERE p.run_id = l.run_id AND p.image_id = l.image_id)\n"
            "ORDER BY l.rank;",
        },
    ]
    return [example for example in out if not example["needs"] or example["needs"] in relations]


def write_sql_page(db: ResultsDB, site: Site, download_info: dict[str, Any] | None, *,
                   environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write sql.html (always) and vendor/duckdb-wasm/ (when found and the database copy
    was published). `download_info` is what report.downloads.write_downloads returned (None
    with --no-downloads). Returns what was written."""
    database = (download_info or {}).get("database")
    wasm = duckdb_wasm.find_duckdb_wasm(environ)
    enabled = wasm.found and database is not None
    vendor_bytes = duckdb_wasm.copy_duckdb_wasm(wasm, site.writer) if enabled else 0
    wasm_bytes = wasm.manifest.get("files", {}).get(duckdb_wasm.WASM_FILE, {}).get("bytes", 0)
    site.render(
        "sql.html.j2", urls.SQL,
        enabled=enabled,
        wasm=wasm,
        database=database,
        examples=examples(db),
        default_limit=DEFAULT_ROW_LIMIT,
        vendor_dir=duckdb_wasm.VENDOR_DIR,
        module_file=duckdb_wasm.MODULE_FILE,
        worker_file=duckdb_wasm.WORKER_FILE,
        wasm_file=duckdb_wasm.WASM_FILE,
        fetch_script=duckdb_wasm.FETCH_SCRIPT,
        env_var=duckdb_wasm.ENV_VAR,
        serve_command=SERVE_COMMAND,
        pinned_version=duckdb_wasm.DUCKDB_WASM_VERSION,
        wasm_size=f"{wasm_bytes / 1e6:.0f} MB" if wasm_bytes else "",
        runs_here=[],
        has_downloads=download_info is not None,
    )
    return {"href": urls.SQL, "enabled": enabled, "vendor_bytes": vendor_bytes,
            "version": wasm.version if enabled else None}
