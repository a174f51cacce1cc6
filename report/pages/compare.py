"""The two-run view (`compare.html`): one image in two lens runs side by side.

One page for every pair: it lists every lens page of the site (run, image, what sets the
run apart) and loads the two chosen pages' data files as classic scripts (so it works from
file://), only ones from that list. Positions are aligned by patch cell for image
positions and by place from the end for text positions (the last one is where the model
predicts the next token), so two prompts of different length still line up. The URL keeps
the choice: `compare.html#a=<run_dir>/<image_id>&b=<run_dir>/<image_id>&from=..&to=..`.
"""

from __future__ import annotations

from typing import Any

from db import queries
from db.store import ResultsDB
from report import urls
from report.catalogue import LensEntry
from report.pages.lens import differing_settings, run_label
from report.site import Site, script_json


def write_compare_page(db: ResultsDB, site: Site, entries: list[LensEntry]) -> None:
    records = {record.run_id: record for record in queries.runs(db, "lens")}
    lens_records = [records[rid] for rid in dict.fromkeys(e.run.run_id for e in entries) if rid in records]
    differing = differing_settings(lens_records)
    catalogue: list[dict[str, Any]] = []
    for entry in entries:
        record = records.get(entry.run.run_id)
        catalogue.append(
            {
                "key": f"{entry.run.dir_name}/{entry.image_id}",
                "run_id": entry.run.run_id,
                "image_id": entry.image_id,
                "file_name": entry.file_name,
                "label": run_label(record, differing) if record is not None else entry.run.model_id,
                "model": entry.run.model_id,
                "prompt": str(entry.run.config.get("prompt") or ""),
                "top_k": entry.run.top_k,
                "data": urls.href(urls.COMPARE, urls.lens_data(entry.run.dir_name, entry.image_id)),
                "page": urls.href(urls.COMPARE, entry.page),
                "png": urls.href(urls.COMPARE, entry.view) if entry.view else "",  # the picture (PNG or JPEG)
            }
        )
    site.render(
        "compare.html.j2",
        urls.COMPARE,
        catalogue_json=script_json(catalogue),
        has_entries=bool(entries),
        differing=sorted(differing),
        runs_here=[e.run for e in {e.run.run_id: e for e in entries}.values()],
    )
