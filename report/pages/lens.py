"""The logit-lens pages: per completely written (run, image), `lens/<run>/<image_id>.html`,
its data file (format: report/lens_codec.py), the view PNG and any extra views' PNGs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from db import queries
from db.store import ResultsDB
from report import lens_codec, urls, views
from report.catalogue import LensEntry
from report.object_cells import ObjectCells
from report.site import ReportError, Site


def _checked_positions(
    positions: list[queries.Position], grid_rows: int, grid_cols: int, context: str
) -> dict[str, list[Any]]:
    """The data file's `positions` arrays; every image position on its own cell of the grid."""
    out: dict[str, list[Any]] = {"position": [], "kind": [], "label": [], "patch_row": [], "patch_col": []}
    seen_patches: set[tuple[int, int]] = set()
    for p in positions:
        patch_row, patch_col = p.patch_row, p.patch_col
        if p.kind == "image":
            if patch_row is None or patch_col is None:
                raise ReportError(f"{context}: image position {p.position} has no patch coordinates")
            if not (0 <= patch_row < grid_rows and 0 <= patch_col < grid_cols):
                raise ReportError(
                    f"{context}: position {p.position} patch ({patch_row}, {patch_col}) is outside "
                    f"the {grid_rows}x{grid_cols} grid"
                )
            if (patch_row, patch_col) in seen_patches:
                raise ReportError(f"{context}: two positions on patch ({patch_row}, {patch_col})")
            seen_patches.add((patch_row, patch_col))
        elif p.kind == "text":
            patch_row = patch_col = None
        elif not p.kind.startswith("image_"):  # further image kinds (e.g. 'image_hr') keep their cells
            raise ReportError(f"{context}: position {p.position} has unknown kind {p.kind!r}")
        out["position"].append(p.position)
        out["kind"].append(p.kind)
        out["label"].append(p.label)
        out["patch_row"].append(patch_row)
        out["patch_col"].append(patch_col)
    return out


def _checked_extra_views(
    db: ResultsDB,
    run_id: str,
    image_id: int,
    context: str,
    positions: dict[str, list[Any]],
    page: str,
    views: list[queries.ExtraView] | None = None,
    view_ext: str = "png",
) -> list[dict[str, Any]]:
    """The extra views of an image (`views`, default: read here), each checked against the
    positions of its kind; `view_ext` is the published pictures' extension."""
    out = []
    for index, view in enumerate(queries.extra_views(db, run_id, image_id) if views is None else views):
        if view.kind in ("image", "text"):
            raise ReportError(f"{context}: extra view {view.name!r} claims kind {view.kind!r}")
        seen: set[tuple[int, int]] = set()
        for k, position in enumerate(positions["position"]):
            if positions["kind"][k] != view.kind:
                continue
            cell = (positions["patch_row"][k], positions["patch_col"][k])
            if (
                cell[0] is None
                or cell[1] is None
                or not (0 <= cell[0] < view.grid_rows and 0 <= cell[1] < view.grid_cols)
            ):
                raise ReportError(
                    f"{context}: {view.kind} position {position} cell {cell} is outside the "
                    f"{view.grid_rows}x{view.grid_cols} grid of view {view.name!r}"
                )
            if cell in seen:
                raise ReportError(f"{context}: two {view.kind} positions on cell {cell} of view {view.name!r}")
            seen.add(cell)
        out.append(
            {
                "name": view.name,
                "kind": view.kind,
                "width": view.width,
                "height": view.height,
                "grid_rows": view.grid_rows,
                "grid_cols": view.grid_cols,
                # the picture's URL (PNG or JPEG: report/views.py); the key is the data format's
                "png": urls.href(page, urls.lens_extra_view(urls.run_dir_name(run_id), image_id, index, view_ext)),
            }
        )
    return out


def _token_dictionary(lens: Any) -> tuple[list[str], np.ndarray, list[int] | None]:
    """(dictionary strings, each row's dictionary index, dictionary token ids or None).

    One entry per distinct (token id, text) where every row has an id (two ids with the
    same text stay two entries, so the page can show each id); per distinct text otherwise.
    """
    encoded = lens.column("token").combine_chunks().dictionary_encode()
    string_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    strings = encoded.dictionary.to_pylist()
    ids_column = lens.column("token_id").combine_chunks()
    if len(ids_column) and ids_column.null_count == 0:
        ids = ids_column.to_numpy(zero_copy_only=False).astype(np.int64)
        # One int64 key per (id, text), ordered as the pairs are (by id, then text code):
        # a 1-D unique is many times faster than np.unique(..., axis=0).
        low = int(ids.min())
        width = max(len(strings), 1)
        keys, codes = np.unique((ids - low) * width + string_codes, return_inverse=True)
        pair_ids, pair_codes = keys // width + low, keys % width
        return [strings[int(c)] for c in pair_codes], codes.astype(np.int64).ravel(), pair_ids.tolist()
    return strings, string_codes, None


def lens_data(
    db: ResultsDB,
    run_id: str,
    image_id: int,
    *,
    objects: ObjectCells | None = None,
    top_k: int | None = None,
    summary: dict[str, Any] | None = None,
    parquet: dict[str, Any] | None = None,
    max_rank: int | None = None,
    view_ext: str = "png",
) -> dict[str, Any]:
    """The lens data object of one completely written (run, image), validated.

    `parquet` (parquet mode, see report/lens_codec.py): ``{"source": ..., "facts":
    queries.LensImageFacts}``; the object then holds ``parquet`` (where the page reads its
    cells) instead of ``packed``, and the lens rows are checked through their aggregate
    `facts` (count and bounds) instead of being read here (the page checks on load that
    its rows cover every cell exactly once). With ``"inputs"`` (queries.LensPageInputs) and
    ``"pieces"`` (token id -> piece of the input tokens) read for many images at once, the
    page makes no query of its own.

    `objects` shares the object cells with the rest of the build (default: computed here);
    `top_k` is the run's configured top-k (default: read from the run), `max_rank` a cap on
    the ranks published (`report build --lens-top-k`; `top_k` is then at most it, and the
    parquet `facts` are of the capped rows). Raises ReportError
    when the rows cannot be mapped faithfully (patches outside the grid, two positions on
    one patch, lens rows for unknown positions or layers or ranks beyond top-k, duplicate or
    missing (layer, position, rank) cells).
    """
    inputs: queries.LensPageInputs | None = parquet.get("inputs") if parquet is not None else None
    marker = inputs.marker if inputs is not None else queries.image_marker(db, run_id, image_id)
    if marker is None:
        raise ReportError(f"run {run_id!r} image {image_id}: not completely written")
    context = f"run {run_id!r} image {image_id}"
    grid_rows, grid_cols = int(marker.grid_rows or 0), int(marker.grid_cols or 0)
    page = urls.lens_page(urls.run_dir_name(run_id), image_id)

    position_rows = inputs.positions if inputs is not None else queries.positions(db, run_id, image_id)
    if len(position_rows) != marker.n_positions:
        raise ReportError(f"{context}: {len(position_rows)} positions written, run_images says {marker.n_positions}")
    positions = _checked_positions(position_rows, grid_rows, grid_cols, context)
    position_numbers = positions["position"]

    positions["token_id"] = (
        list(inputs.token_ids) if inputs is not None else queries.position_token_ids(db, run_id, image_id)
    )
    if parquet is not None:
        if top_k is not None and max_rank is not None:
            top_k = min(top_k, max_rank)
        return _parquet_lens_data(
            db, run_id, image_id, marker, positions, parquet, objects=objects, top_k=top_k, summary=summary, page=page,
            view_ext=view_ext,
        )  # fmt: skip
    lens = queries.lens_rows_with_ids(db, run_id, image_id, max_rank)
    layer = lens.column("layer").to_numpy().astype(np.int64)
    position = lens.column("position").to_numpy().astype(np.int64)
    rank = lens.column("rank").to_numpy().astype(np.int64)
    prob = lens.column("prob").to_numpy().astype(np.float64)
    tokens, token_codes, token_ids = _token_dictionary(lens)
    pieces_by_id = queries.token_pieces(
        db, run_id, [*(token_ids or []), *(i for i in positions["token_id"] if i is not None)]
    )
    # The tokenizer's piece of each dictionary entry and input position (None: not
    # recorded, e.g. a run written before schema 9; the page then shows the text alone).
    token_pieces = [pieces_by_id.get(int(i)) for i in token_ids] if token_ids is not None else None
    if token_pieces is not None and all(piece is None for piece in token_pieces):
        token_pieces = None
    positions["piece"] = [
        pieces_by_id.get(int(i)) if i is not None and kind == "text" else None
        for i, kind in zip(positions["token_id"], positions["kind"])
    ]

    n_rows = len(position_rows)
    if len(layer) and (layer.min() < 0 or rank.min() < 1):
        raise ReportError(f"{context}: lens rows with a negative layer or a rank below 1")
    n_layers = int(marker.n_layers) if marker.n_layers is not None else int(layer.max(initial=-1)) + 1
    if len(layer) and layer.max() >= n_layers:
        raise ReportError(f"{context}: lens rows for layer {int(layer.max())}, run_images says {n_layers} layers")
    if top_k is None:
        record = queries.run(db, run_id)
        top_k = record.top_k if record is not None else None
    if top_k is None:
        # Databases written before the run config recorded top_k: the deepest stored rank
        # is the only record of it.
        top_k = int(rank.max(initial=0))
    if max_rank is not None:
        top_k = min(top_k, max_rank)
    if len(rank) and rank.max() > top_k:
        raise ReportError(f"{context}: lens rows for rank {int(rank.max())}, the run's top-k is {top_k}")

    row_of_position = np.full(max(position_numbers, default=-1) + 1, -1, dtype=np.int64)
    row_of_position[position_numbers] = np.arange(n_rows)
    known = (position >= 0) & (position < len(row_of_position))
    row = np.full(len(position), -1, dtype=np.int64)
    row[known] = row_of_position[position[known]]
    if (row < 0).any():
        unknown = int(position[row < 0][0])
        raise ReportError(f"{context}: lens rows for position {unknown}, which is not in positions")

    flat = (layer * n_rows + row) * top_k + (rank - 1)
    n_cells = n_layers * n_rows * top_k
    # Every index is in [0, n_cells) after the checks above: counting finds duplicates in O(n).
    if len(flat) and np.bincount(flat, minlength=n_cells).max() > 1:
        raise ReportError(f"{context}: duplicate lens rows for one (layer, position, rank)")
    # A gap would render as an empty cell that reads like data; a complete image has none.
    if n_cells == 0 or len(flat) != n_cells:
        raise ReportError(
            f"{context}: lens rows cover {len(flat)} of {n_layers} layers x {n_rows} positions "
            f"x top-{top_k} = {n_cells} cells"
        )

    if summary is not None:  # the index's per-image columns, from the arrays (not the packed data)
        at = ((n_layers - 1) * n_rows + (n_rows - 1)) * top_k
        cell = int(np.flatnonzero(flat == at)[0])
        summary.update(
            {
                "positions": n_rows,
                "layers": n_layers,
                "top_k": top_k,
                "image_positions": sum(1 for k in positions["kind"] if k == "image"),
                "next_token": tokens[int(token_codes[cell])],
                # as the page shows it: through the data file's probability code
                "next_prob": float(lens_codec.decode_probs(lens_codec.encode_probs(prob[cell : cell + 1]))[0]),
            }
        )
    view = queries.view_size(db, run_id, image_id)
    objects = ObjectCells.from_db(db) if objects is None else objects
    return {
        "format": lens_codec.DATA_FORMAT,
        "run_id": run_id,
        "image_id": image_id,
        "n_layers": n_layers,
        "top_k": top_k,
        "grid_rows": grid_rows,
        "grid_cols": grid_cols,
        "n_cells": n_cells,
        "positions": positions,
        "view": {"width": view[0], "height": view[1]} if view else None,
        "extra_views": _checked_extra_views(db, run_id, image_id, context, positions, page, view_ext=view_ext),
        "objects": objects.page_objects(run_id, image_id, grid_rows, grid_cols),
        "packed": lens_codec.pack_cells(tokens, token_codes, prob, flat, n_cells, token_ids, token_pieces),
    }


def _parquet_lens_data(
    db: ResultsDB,
    run_id: str,
    image_id: int,
    marker: Any,
    positions: dict[str, list[Any]],
    parquet: dict[str, Any],
    *,
    objects: ObjectCells | None,
    top_k: int | None,
    summary: dict[str, Any] | None,
    page: str,
    view_ext: str,
) -> dict[str, Any]:
    """lens_data's parquet mode: the non-cell data, and where the page reads its cells."""
    context = f"run {run_id!r} image {image_id}"
    facts: queries.LensImageFacts = parquet["facts"]
    inputs: queries.LensPageInputs | None = parquet.get("inputs")
    pieces_by_id = parquet.get("pieces")
    if pieces_by_id is None:
        pieces_by_id = queries.token_pieces(db, run_id, [i for i in positions["token_id"] if i is not None])
    positions["piece"] = [
        pieces_by_id.get(int(i)) if i is not None and kind == "text" else None
        for i, kind in zip(positions["token_id"], positions["kind"])
    ]
    n_rows = len(positions["position"])
    n_layers = int(marker.n_layers) if marker.n_layers is not None else facts.max_layer + 1
    if top_k is None:
        record = queries.run(db, run_id)
        top_k = record.top_k if record is not None and record.top_k is not None else facts.max_rank
    if facts.min_layer < 0 or facts.min_rank < 1:
        raise ReportError(f"{context}: lens rows with a negative layer or a rank below 1")
    if facts.max_layer >= n_layers:
        raise ReportError(f"{context}: lens rows for layer {facts.max_layer}, run_images says {n_layers} layers")
    if facts.max_rank > top_k:
        raise ReportError(f"{context}: lens rows for rank {facts.max_rank}, the run's top-k is {top_k}")
    known = set(positions["position"])
    for position in (facts.min_position, facts.max_position):
        if position not in known:
            raise ReportError(f"{context}: lens rows for position {position}, which is not in positions")
    n_cells = n_layers * n_rows * top_k
    if n_cells == 0 or facts.rows != n_cells:
        raise ReportError(
            f"{context}: lens rows cover {facts.rows} of {n_layers} layers x {n_rows} positions "
            f"x top-{top_k} = {n_cells} cells"
        )
    source = parquet["source"]
    if source["row_end"] - source["row_start"] != n_cells:
        raise ReportError(
            f"{context}: the lens Parquet file holds {source['row_end'] - source['row_start']} rows of it"
        )
    if summary is not None:
        prob = np.asarray([facts.next_prob if facts.next_prob is not None else 0.0])
        summary.update(
            {
                "positions": n_rows,
                "layers": n_layers,
                "top_k": top_k,
                "image_positions": sum(1 for k in positions["kind"] if k == "image"),
                "next_token": facts.next_token,
                "next_prob": float(lens_codec.decode_probs(lens_codec.encode_probs(prob))[0]),
            }
        )
    view = inputs.view if inputs is not None else queries.view_size(db, run_id, image_id)
    objects = ObjectCells.from_db(db) if objects is None else objects
    extra = inputs.extra_views if inputs is not None else None
    return {
        "format": lens_codec.DATA_FORMAT,
        "run_id": run_id,
        "image_id": image_id,
        "n_layers": n_layers,
        "top_k": top_k,
        "grid_rows": int(marker.grid_rows or 0),
        "grid_cols": int(marker.grid_cols or 0),
        "n_cells": n_cells,
        "positions": positions,
        "view": {"width": view[0], "height": view[1]} if view else None,
        "extra_views": _checked_extra_views(db, run_id, image_id, context, positions, page, extra, view_ext),
        "objects": objects.page_objects(run_id, image_id, int(marker.grid_rows or 0), int(marker.grid_cols or 0)),
        "parquet": dict(source),
    }


def write_lens_page(
    db: ResultsDB,
    site: Site,
    entry: LensEntry,
    objects: ObjectCells,
    published: frozenset[tuple[str, int]] | None = None,
    parquet: dict[str, Any] | None = None,
    lens_runs: list[Any] | None = None,
    pictures: dict[tuple[str, int, str], bytes] | None = None,
) -> dict[str, Any]:
    """Write one lens page with its data file and pictures; returns its data object.

    published: the (run_id, image_id) lens pages this build writes (None: all), so the links
    to the same image in other runs never point at a page left out (`--lens-pages`).
    parquet: where the page reads its cells in parquet mode (see `lens_data`; None: inline).
    lens_runs: queries.runs(db, "lens"), read once per build (None: read per page); with
    `published` it names the other runs of the image without a query per page.
    pictures: the image's PNGs read with others' (queries.image_pictures), else read here."""
    run = entry.run
    if pictures is None:
        pictures = queries.image_pictures(db, run.run_id, [entry.image_id])
    summary: dict[str, Any] = {}
    cap = site.common.get("lens_top_k")  # report build --lens-top-k: ranks 1..cap published
    top_k = run.top_k if cap is None or run.top_k is None else min(run.top_k, cap)
    data = lens_data(
        db, run.run_id, entry.image_id, objects=objects, top_k=top_k, summary=summary, parquet=parquet,
        max_rank=cap, view_ext=run.view_ext,
    )  # fmt: skip
    if entry.has_view:
        png = pictures[("image_views", entry.image_id, "")]
        site.writer.write(entry.view, views.encode(png, run.view_format))
    for index, view in enumerate(data["extra_views"]):
        png = pictures[("extra_views", entry.image_id, view["name"])]
        site.writer.write(
            urls.lens_extra_view(run.dir_name, entry.image_id, index, run.view_ext), views.encode(png, run.view_format)
        )
    other_runs = _other_runs(db, entry, published, lens_runs)
    data_path = urls.lens_data(run.dir_name, entry.image_id)
    written = data
    if "parquet" in data:  # the positions once per distinct layout of the run, not in every data file
        content, digest = lens_codec.positions_file(data["positions"])
        positions_path = urls.lens_positions(run.dir_name, digest)
        site.writer.write_shared(positions_path, content)
        written = lens_codec.shared_positions_data(data, urls.href(data_path, positions_path), content, digest)
    site.writer.write(data_path, lens_codec.data_script(written))
    site.render(
        "lens.html.j2",
        entry.page,
        entry=entry,
        run=run,
        runs_here=[run],
        data_path=data_path,
        n_layers=data["n_layers"],
        n_positions=len(data["positions"]["position"]),
        grid=(data["grid_rows"], data["grid_cols"]),
        extra_views=data["extra_views"],
        top_k=data["top_k"],
        collected_top_k=run.top_k,
        has_objects=bool(data["objects"]),
        has_pieces=bool(data["packed"].get("token_pieces_bytes"))
        if "packed" in data
        else bool(data["parquet"]["pieces"]),
        parquet_mode="parquet" in data,
        prob_bits=data["parquet"]["prob_bits"] if "parquet" in data else None,
        other_runs=other_runs,
    )
    entry.summary = summary  # the index's per-image columns (as _summary(data) computes them)
    return data


def run_label(record: Any, differing: set[str]) -> str:
    """A short name for a run that says what sets it apart: model, then prompt / top-k where they differ."""
    config = record.config or {}
    parts = [record.model_id]
    if "prompt" in differing:
        prompt = str(config.get("prompt") or "no prompt recorded").replace("\n", " ")
        parts.append("prompt \u201c" + (prompt if len(prompt) <= 40 else prompt[:39] + "\u2026") + "\u201d")
    if "top_k" in differing:
        parts.append(f"top-{config.get('top_k', '?')}")
    if "dtype" in differing:
        parts.append(str(config.get("dtype")))
    if not differing:
        parts.append(record.run_id)
    return " \u00b7 ".join(parts)


def differing_settings(records: list[Any]) -> set[str]:
    """Which of model, prompt, top-k, dtype differ between runs."""
    keys = {
        "model": lambda r: r.model_id,
        "prompt": lambda r: (r.config or {}).get("prompt"),
        "top_k": lambda r: (r.config or {}).get("top_k"),
        "dtype": lambda r: (r.config or {}).get("dtype"),
    }
    return {name for name, get in keys.items() if len({json_key(get(r)) for r in records}) > 1}


def json_key(value: Any) -> str:
    return repr(value)


def _other_runs(
    db: ResultsDB,
    entry: LensEntry,
    published: frozenset[tuple[str, int]] | None,
    lens_runs: list[Any] | None = None,
) -> list[dict[str, str]]:
    """Links to the same image in every other lens run whose page is written, each named by what differs."""
    if published is not None and lens_runs is not None:
        # A published (run, image) is completely written and not skipped (catalogue.load_lens_entries),
        # so this is lens_runs_of_image without its query.
        records = [record for record in lens_runs if (record.run_id, entry.image_id) in published]
    else:
        records = [
            record
            for record in queries.lens_runs_of_image(db, entry.image_id)
            if published is None or (record.run_id, entry.image_id) in published
        ]
    if len(records) < 2:
        return []
    differing = differing_settings(records)
    out = []
    here = (entry.run.dir_name, entry.image_id)
    for record in records:
        if record.run_id == entry.run.run_id:
            continue
        dir_name = urls.run_dir_name(record.run_id)
        out.append(
            {
                "run_id": record.run_id,
                "label": run_label(record, differing),
                "page": urls.lens_page(dir_name, entry.image_id),
                "compare": urls.compare_fragment(here, (dir_name, entry.image_id)),
            }
        )
    return out


def _summary(data: dict[str, Any]) -> dict[str, Any]:
    """Per-image numbers for the index: positions, layers, and the last layer's top-1 at
    the last position (what the model predicts next) with its probability."""
    tokens, index, prob = lens_codec.unpack_lens_data(data)
    n_rows, top_k, n_layers = len(data["positions"]["position"]), data["top_k"], data["n_layers"]
    at = ((n_layers - 1) * n_rows + (n_rows - 1)) * top_k
    return {
        "positions": n_rows,
        "layers": n_layers,
        "top_k": top_k,
        "image_positions": sum(1 for k in data["positions"]["kind"] if k == "image"),
        "next_token": tokens[int(index[at])],
        "next_prob": float(prob[at]),
    }
