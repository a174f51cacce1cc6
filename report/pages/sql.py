"""The SQL console page (`sql.html`): DuckDB-WASM in the browser over the site's Parquet
downloads, with example queries one click away.

The console runs DuckDB-WASM 1.28.0 (DuckDB 0.9.1, the parquet reader built in, see
report/duckdb_wasm.py) on an in-memory catalog `results` of views only: each table a view
over its published Parquet files (`logit_lens` joins the rows' token ids back to their
text, `lens_tokens`), plus the database's own views (lens_top1, ablation_summary, ...).
The statements are written into the page (`console_views`, checked here with native
DuckDB over the same files); the browser registers every Parquet file by its site path
and reads it with HTTP range requests, so a query on one image or one layer moves only
the footers and the row groups it needs, never the whole run. Nothing fetches an
extension: no request leaves the site.

The page needs http(s): browsers refuse module scripts, workers and fetch() on file://,
and range requests do not exist there; it says so. Its JavaScript is
templates/static/sql.js; the WASM files come from report/duckdb_wasm.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from db import queries
from db.store import ResultsDB
from report import duckdb_wasm, urls
from report.site import Site, script_json

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
    ]
    one = _first_lens_image(db) if "run_images" in relations and "logit_lens" in relations else None
    if one is not None:
        run_id, image_id, layer, position = one
        out.append(
            {
                "title": "Logit lens: top-k at the last position, middle layer, one image",
                "needs": "run_images",
                "scope": "one",
                "description": f"The lens's top-k at the last input position (position {position}) in the middle "
                f"layer ({layer}) of image {image_id}: constant filters, so only the row groups of that image whose "
                "layer range holds that layer are read.",
                "sql": "SELECT run_id, image_id, layer, position, rank, token_id, token, round(prob, 4) AS prob\n"
                f"FROM logit_lens\nWHERE run_id = {_sql_string(run_id)} AND image_id = {image_id}\n"
                f"  AND layer = {layer} AND position = {position}\nORDER BY rank;",
            }
        )
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


def _list(files: list[str]) -> str:
    return "[" + ", ".join(_sql_string(f) for f in files) + "]"


def console_views(db: ResultsDB, download_info: dict[str, Any], root: Path) -> list[dict[str, str]]:
    """The console's CREATE VIEW statements, in an order that creates each after what it
    reads: one view per published table over its Parquet files (site paths), then the
    database's own views that the published tables can carry. Each is run here first with
    native DuckDB over the files under `root` (the staged site); one that fails is left out."""
    import duckdb

    from report.downloads import LENS_TABLE, LENS_TOKENS

    parquet: dict[str, list[str]] = download_info.get("parquet") or {}
    keep_token = set(download_info.get("lens_token_files") or [])
    statements: list[tuple[str, str]] = []
    for table, files in sorted(parquet.items()):
        if table == LENS_TABLE and parquet.get(LENS_TOKENS):
            columns = [name for name, _ in queries.ordered_columns(db, LENS_TABLE)]
            mixed = any(f in keep_token for f in files)
            select = ", ".join(
                ('coalesce(l."token", t."token") AS "token"' if mixed else 't."token"') if c == "token" else f'l."{c}"'
                for c in columns
            )
            options = ", union_by_name = true" if mixed else ""
            sql = (
                f'CREATE VIEW "{table}" AS SELECT {select}\nFROM read_parquet({_list(files)}{options}) AS l\n'
                f'LEFT JOIN "{LENS_TOKENS}" AS t ON t.run_id = l.run_id AND t.token_id = l.token_id'
            )
        else:
            sql = f'CREATE VIEW "{table}" AS SELECT * FROM read_parquet({_list(files)})'
        statements.append((table, sql))
    statements.sort(key=lambda item: item[0] == LENS_TABLE)  # after lens_tokens
    statements += [(name, sql) for name, sql in queries.view_definitions(db) if name not in parquet]
    con = duckdb.connect()
    out: list[dict[str, str]] = []
    try:
        con.execute(f"SET file_search_path = {_sql_string(str(root))}")
        pending = statements
        while pending:  # views on views: create in dependency order
            failed = []
            for name, sql in pending:
                try:
                    con.execute(sql)
                    out.append({"name": name, "sql": sql})
                except duckdb.Error:
                    failed.append((name, sql))
            if len(failed) == len(pending):
                break  # a view over a table that is not published: left out
            pending = failed
    finally:
        con.close()
    return out


def one_image_bytes(root: Path, files: list[str], image_id: int) -> tuple[int, int]:
    """(bytes, total bytes): what a reader needs of the Parquet `files` (site paths under
    `root`) for a query on one image: every file's footer, and the column chunks of the row
    groups whose image_id statistics can hold the image. The console reads about this much
    (DuckDB-WASM reads whole column chunks and footers)."""
    import pyarrow.parquet as pq

    needed = total = 0
    for relative in files:
        path = root / relative
        size = path.stat().st_size
        total += size
        with path.open("rb") as handle:
            handle.seek(size - 8)
            needed += int.from_bytes(handle.read(4), "little") + 8
        meta = pq.ParquetFile(path).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if "image_id" not in names:
            continue
        column = names.index("image_id")
        for group in range(meta.num_row_groups):
            chunk = meta.row_group(group).column(column)
            stats = chunk.statistics
            if stats is None or not stats.has_min_max or stats.min <= image_id <= stats.max:
                needed += sum(meta.row_group(group).column(i).total_compressed_size for i in range(meta.num_columns))
    return needed, total


def _first_lens_image(db: ResultsDB) -> tuple[str, int, int, int] | None:
    """(run_id, image_id, middle layer, last position) of the first image of the first lens run."""
    rows = db.sql(
        "SELECT ri.run_id, ri.image_id, ri.n_layers // 2, (SELECT max(position) FROM positions p "
        "WHERE p.run_id = ri.run_id AND p.image_id = ri.image_id) FROM run_images ri JOIN runs r USING (run_id) "
        "WHERE r.experiment = 'lens' AND ri.n_layers IS NOT NULL "
        "ORDER BY r.started_at, ri.run_id, ri.image_id LIMIT 1"
    )
    if not rows or rows[0][3] is None:
        return None
    run_id, image_id, layer, position = rows[0]
    return str(run_id), int(image_id), int(layer), int(position)


def write_sql_page(
    db: ResultsDB, site: Site, download_info: dict[str, Any] | None, *, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Write sql.html (always), and vendor/duckdb-wasm/ (when DuckDB-WASM was found and the
    Parquet files were published). `download_info` is what report.downloads.write_downloads
    returned (None with --no-downloads). Returns what was written."""
    parquet = (download_info or {}).get("parquet") or {}
    wasm = duckdb_wasm.find_duckdb_wasm(environ)
    enabled = wasm.found and bool(parquet)
    vendor_bytes = duckdb_wasm.copy_duckdb_wasm(wasm, site.writer) if enabled else 0
    views = console_views(db, download_info or {}, site.writer.root) if enabled else []
    files = sorted({f for files in parquet.values() for f in files})
    total = sum((site.writer.root / f).stat().st_size for f in files) if enabled else 0
    wasm_bytes = wasm.manifest.get("files", {}).get(duckdb_wasm.WASM_FILE, {}).get("bytes", 0)
    relations = (
        {view["name"] for view in views} if enabled else set(parquet) | {n for n, _ in queries.view_definitions(db)}
    )
    shown = [e for e in examples(db) if not e["needs"] or e["needs"] in relations]
    lens_files = parquet.get("logit_lens", [])
    lens_bytes = sum((site.writer.root / f).stat().st_size for f in lens_files) if enabled else 0
    first = _first_lens_image(db) if lens_files and enabled else None
    one_image = ""
    if first is not None:
        needed, _ = one_image_bytes(site.writer.root, lens_files, first[1])
        one_image = (
            f"A query on one image of this site (the last example) needs about {needed / 1e6:.1f} MB of the "
            f"{lens_bytes / 1e6:.0f} MB of lens files: the {len(lens_files)} files' footers and that image's row "
            "groups (DuckDB-WASM reads ahead, so up to a few times that may cross the network)."
        )
    for example in shown:
        example["scope_note"] = ""
        if example["needs"] in ("lens_top1", "lens_object_hits") and lens_bytes and not example.get("empty_note"):
            example["scope_note"] = (
                f"Reads the lens rows of every image: on this site a good part of the {len(lens_files)} lens "
                f"Parquet files ({lens_bytes / 1e6:.0f} MB) crosses the network; a query on one image reads "
                "a small part of them."
            )
    site.render(
        "sql.html.j2",
        urls.SQL,
        enabled=enabled,
        wasm=wasm,
        parquet_size=f"{total / 1e6:.1f} MB",
        parquet_count=len(files),
        console_json=script_json({"files": files, "views": views}) if enabled else "{}",
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
        duckdb_version=duckdb_wasm.DUCKDB_VERSION,
        wasm_size=f"{wasm_bytes / 1e6:.0f} MB" if wasm_bytes else "",
        runs_here=[],
        has_downloads=download_info is not None,
        prob_bits=(download_info or {}).get("prob_bits"),
        lens_top_k=(download_info or {}).get("lens_top_k"),
        one_image=one_image,
    )
    return {
        "href": urls.SQL,
        "enabled": enabled,
        "vendor_bytes": vendor_bytes,
        "version": wasm.version if enabled else None,
        "views": views,
    }
