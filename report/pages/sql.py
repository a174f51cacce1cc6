"""The SQL console page (`sql.html`): DuckDB-WASM in the browser over the site's Parquet
downloads, with example queries one click away.

The console attaches `data/console.duckdb` read-only as `results`: a database of views
only, each table a view over its published Parquet files, plus the database's own views
(lens_top1, ablation_summary, ...). The browser registers every Parquet file by its site
path and DuckDB-WASM reads them with HTTP range requests, so a query on one image or one
layer moves only the footers and the row groups it needs, never the whole run.

The page needs http(s): browsers refuse module scripts, workers and fetch() on file://,
and range requests do not exist there; it says so. Its JavaScript is
templates/static/sql.js; the WASM files come from report/duckdb_wasm.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from db import queries
from db.store import ResultsDB
from report import duckdb_wasm, urls
from report.site import Site, script_json

SERVE_COMMAND = "llava-interp report serve --dir site"
CONSOLE_DATABASE = "data/console.duckdb"
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
    # An example over tables without rows returns nothing: it stays, with a note saying so.
    sources = {
        "ablation_summary": "ablations",
        "blocking_curves": "blocking",
        "lens_top1": "logit_lens",
        "lens_object_hits": "logit_lens",
        "run_images": "logit_lens",
    }
    empty = {table for table in set(sources.values()) if table not in relations or not queries.count_rows(db, table)}
    for example in out:
        source = sources.get(example["needs"])
        example["empty_note"] = (
            f"Returns no rows here: this site's runs have no {source} rows." if source in empty else ""
        )
    if "lens_object_hits" in relations and "annotations" in relations and not queries.count_rows(db, "annotations"):
        for example in out:
            if example["needs"] == "lens_object_hits":
                example["empty_note"] = "Returns no rows here: no image of this site has annotations."
    return [example for example in out if not example["needs"] or example["needs"] in relations]


def write_sql_page(
    db: ResultsDB, site: Site, download_info: dict[str, Any] | None, *, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Write sql.html (always), and vendor/duckdb-wasm/ and data/console.duckdb (when
    DuckDB-WASM was found and the Parquet files were published). `download_info` is what
    report.downloads.write_downloads returned (None with --no-downloads). Returns what was
    written."""
    parquet = (download_info or {}).get("parquet") or {}
    copy = (download_info or {}).get("database")
    wasm = duckdb_wasm.find_duckdb_wasm(environ)
    # "parquet": views over the Parquet files, read in parts (needs the vendored parquet
    # extension); "database": the whole database copy, fetched once (small sites).
    mode = "parquet" if wasm.found and wasm.has_parquet and parquet else "database" if wasm.found and copy else ""
    enabled = bool(mode)
    vendor_bytes = duckdb_wasm.copy_duckdb_wasm(wasm, site.writer) if enabled else 0
    database = copy if mode == "database" else None
    if mode == "parquet":
        from report.downloads import SITE_DB_STORAGE_VERSION

        queries.export_console_database(
            db, site.writer.path(CONSOLE_DATABASE), site.writer.root, parquet, SITE_DB_STORAGE_VERSION
        )
        size = site.writer.account(CONSOLE_DATABASE)
        total = sum((site.writer.root / f).stat().st_size for files in parquet.values() for f in files)
        database = {
            "href": CONSOLE_DATABASE,
            "size": f"{size / 1e3:.0f} KB",
            "parquet_size": f"{total / 1e6:.1f} MB",
            "files": sorted(f for files in parquet.values() for f in files),
        }
    wasm_bytes = wasm.manifest.get("files", {}).get(duckdb_wasm.WASM_FILE, {}).get("bytes", 0)
    relations = set(parquet) | {name for name, _ in queries.view_definitions(db)}
    shown = [e for e in examples(db) if not e["needs"] or e["needs"] in relations]
    site.render(
        "sql.html.j2",
        urls.SQL,
        enabled=enabled,
        mode=mode,
        no_parquet_extension=wasm.found and not wasm.has_parquet and bool(parquet),
        extensions_dir=f"{duckdb_wasm.VENDOR_DIR}/{duckdb_wasm.EXTENSIONS_DIR}/",
        wasm=wasm,
        database=database,
        parquet_files=script_json(database["files"]) if database and mode == "parquet" else "[]",
        examples=shown,
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
    return {
        "href": urls.SQL,
        "enabled": enabled,
        "vendor_bytes": vendor_bytes,
        "version": wasm.version if enabled else None,
    }
