"""Properties of the report's parts: relative URLs, top-k from the run config, object cells
rasterised once per (run, image), and the read API's records.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import pytest
from test_report import N_LAYERS, TOP_K, _load_data, _make_db, _quant_db

import report.object_cells
from db import queries
from db.geometry import object_cells_by_category
from db.store import ResultsDB
from report import urls
from report.build import ReportError, build_site, run_dir_name

PAGES = [
    urls.INDEX,
    urls.lens_page("run-a", 7),
    urls.experiment_page("ablation", "run-a"),
    urls.experiment_image_page("blocking", "run-b", 9),
]
TARGETS = [
    urls.INDEX,
    urls.static("site.css"),
    urls.lens_page("run-a", 7),
    urls.lens_data("run-a", 7),
    urls.lens_extra_view("run-a", 7, 0),
    urls.lens_extra_view("run-a", 7, 0, "jpg"),
    urls.lens_view("run-a", 7, "jpg"),
    urls.experiment_page("ablation", "run-a"),
    urls.experiment_image_page("ablation", "run-a", 3),
    urls.experiment_image_view("blocking", "run-b", 9),
    urls.experiment_image_view("blocking", "run-b", 9, "jpg"),
    urls.run_download("run-a", "positions"),
    urls.SITE_DATABASE,
]


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("target", TARGETS)
def test_every_href_resolves_to_its_target(page: str, target: str) -> None:
    link = urls.href(page, target)
    assert not link.startswith("/") and "://" not in link
    # Resolved the way a browser resolves a relative URL against the page's folder.
    assert posixpath.normpath(posixpath.join(posixpath.dirname(page), link)) == target


def test_hrefs_are_percent_encoded() -> None:
    assert urls.href(urls.INDEX, "lens/a b/1.html") == "lens/a%20b/1.html"


def _set_top_k(db_path: Path, run_id: str, top_k: int | None) -> None:
    with ResultsDB(db_path) as db:
        (config,) = db.sql("SELECT config FROM runs WHERE run_id = ?", [run_id])[0]
        config = queries.parse_config(config)
        config.pop("top_k", None)
        if top_k is not None:
            config["top_k"] = top_k
        db.sql("UPDATE runs SET config = ? WHERE run_id = ?", [json.dumps(config), run_id])


def test_top_k_comes_from_the_run_config(tmp_path: Path) -> None:
    db_path = tmp_path / "r.duckdb"
    run_ids = _make_db(db_path)
    with ResultsDB(db_path, read_only=True) as db:
        assert {run.run_id: run.top_k for run in queries.runs(db, "lens")} == {
            run_ids["hostile"]: TOP_K,
            run_ids["clean"]: TOP_K,
        }
    # One rank fewer in the config than in the rows: the rows cannot be laid out faithfully.
    _set_top_k(db_path, run_ids["clean"], TOP_K - 1)
    with pytest.raises(ReportError, match=f"rank {TOP_K}, the run's top-k is {TOP_K - 1}"):
        build_site(db_path, tmp_path / "site")
    # One rank more: every cell's last rank is missing.
    _set_top_k(db_path, run_ids["clean"], TOP_K + 1)
    with pytest.raises(ReportError, match=f"top-{TOP_K + 1}"):
        build_site(db_path, tmp_path / "site")
    # No top_k in the config (databases written before it was recorded): the stored ranks.
    _set_top_k(db_path, run_ids["clean"], None)
    build_site(db_path, tmp_path / "site", downloads=False)
    data = _load_data(tmp_path / "site" / "lens" / run_dir_name(run_ids["clean"]) / "102.data.js")
    assert data["top_k"] == TOP_K and data["n_cells"] == N_LAYERS * 21 * TOP_K


def test_object_cells_are_rasterised_once_per_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db_path = tmp_path / "quant.duckdb"
    run = _quant_db(db_path)
    calls: list[tuple[int, int]] = []

    def counting(annotations, geometry, grid_rows, grid_cols):  # type: ignore[no-untyped-def]
        calls.append((grid_rows, grid_cols))
        return object_cells_by_category(annotations, geometry, grid_rows, grid_cols)

    monkeypatch.setattr(report.object_cells, "object_cells_by_category", counting)
    build_site(db_path, tmp_path / "site", downloads=False)
    assert len(calls) == 1
    # Both consumers got those cells: the lens page's objects and the quantitative page.
    (obj,) = _load_data(tmp_path / "site" / "lens" / run_dir_name(run) / "5.data.js")["objects"]
    assert obj["cells"] == [0, 1, 4, 5]
    assert "75.0%" in (tmp_path / "site" / "quantitative.html").read_text(encoding="utf-8")


def test_read_api_returns_records(tmp_path: Path) -> None:
    db_path = tmp_path / "r.duckdb"
    run_ids = _make_db(db_path)
    with ResultsDB(db_path, read_only=True) as db:
        written = {(image.run_id, image.image_id) for image in queries.written_images(db, "lens")}
        positions = queries.positions(db, run_ids["hostile"], 101)
        expected_rows = db.sql(
            "SELECT count(*) FROM positions WHERE run_id = ? AND image_id = 101", [run_ids["hostile"]]
        )[0][0]
        marker = queries.image_marker(db, run_ids["hostile"], 101)
    # 103 was interrupted (no marker) and 104 skipped: neither is a written image.
    assert written == {(run_ids["hostile"], 101), (run_ids["hostile"], 102), (run_ids["clean"], 102)}
    assert len(positions) == expected_rows == marker.n_positions
    assert [p.position for p in positions] == sorted(p.position for p in positions)
    assert {p.kind for p in positions} == {"image", "text"}
