"""Incremental rebuilds (report/incremental.py): a second `report build` into the same
folder leaves the files of unchanged lens pages untouched (same inode, same mtime),
renders the pages of new or changed images, and removes the pages of deleted runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pytest
from test_report import _make_db

from report import urls
from report.build import build_site, run_dir_name


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()
    }


def _lens_files(out: Path, run_id: str, image_id: int) -> list[str]:
    base = f"lens/{run_dir_name(run_id)}/{image_id}"
    return [rel for rel in _snapshot(out) if rel.startswith(base + ".") or rel.startswith(base + "-")]


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "results.duckdb"
    return path, _make_db(path)


def _lens_runs(path: Path, out: Path) -> dict[str, list[int]]:
    """Lens run id -> the images with a page in the site at `out`."""
    con = duckdb.connect(str(path), read_only=True)
    run_ids = [r for (r,) in con.execute("SELECT run_id FROM runs WHERE experiment = 'lens'").fetchall()]
    con.close()
    return {
        run_id: sorted(int(p.stem) for p in (out / "lens" / run_dir_name(run_id)).glob("*.html")) for run_id in run_ids
    }


def test_unchanged_pages_are_not_rewritten(db: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, _ = db
    out = tmp_path / "site"
    first = build_site(path, out)
    assert first.lens_pages_reused == 0
    before = _snapshot(out)
    second = build_site(path, out)
    after = _snapshot(out)
    assert second.lens_pages_reused == first.lens_pages == 3
    lens = [rel for rel in before if rel.startswith("lens/")]
    assert lens and all(after[rel] == before[rel] for rel in lens)  # same inode, same mtime
    for rel in ("static/site.css", "static/lens.js", urls.NOJEKYLL):  # identical bytes: left in place
        assert after[rel] == before[rel], rel
    assert set(after) == set(before)
    manifest = json.loads((out / urls.BUILD_MANIFEST).read_text(encoding="utf-8"))
    assert len(manifest["lens"]) == 3


def test_new_image_and_changed_rows_are_rendered_deleted_runs_removed(
    db: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    path, _ = db
    out = tmp_path / "site"
    build_site(path, out)
    runs = _lens_runs(path, out)
    shared = sorted(set.intersection(*(set(images) for images in runs.values())))
    run_a = max(runs, key=lambda r: len(runs[r]))  # two images, one shared with run_b
    run_b = next(r for r in runs if r != run_a)
    alone = [image for image in runs[run_a] if image not in shared]
    assert len(alone) == 1 and len(shared) == 1
    before = _snapshot(out)

    # A new image in run_a (a copy of another image's rows), and one changed lens row of alone[0].
    new_image = max(runs[run_a]) + 100
    con = duckdb.connect(str(path))
    con.execute(
        "INSERT INTO images SELECT ? AS image_id, * EXCLUDE (image_id) FROM images WHERE image_id = ?",
        [new_image, alone[0]],
    )
    for table in ("run_images", "positions", "logit_lens", "image_views"):
        con.execute(
            f"INSERT INTO {table} SELECT * REPLACE (? AS image_id) FROM {table} WHERE run_id = ? AND image_id = ?",
            [new_image, run_a, alone[0]],
        )
    con.execute(
        "UPDATE logit_lens SET prob = prob / 2 WHERE run_id = ? AND image_id = ? AND layer = 1 AND rank = 1",
        [run_a, alone[0]],
    )
    con.close()
    summary = build_site(path, out)
    after = _snapshot(out)
    assert summary.lens_pages == 4 and summary.lens_pages_reused == 2
    untouched = _lens_files(out, run_a, shared[0]) + _lens_files(out, run_b, shared[0])
    assert untouched and all(after[rel] == before[rel] for rel in untouched)
    changed = [rel for rel in _lens_files(out, run_a, alone[0]) if rel.endswith((".html", ".data.js"))]
    assert len(changed) == 2 and all(after[rel] != before[rel] for rel in changed)
    added = _lens_files(out, run_a, new_image)
    assert added and not any(rel in before for rel in added)

    # Deleting run_b removes its pages; run_a's page of the shared image changes (no link to run_b).
    con = duckdb.connect(str(path))
    for table in ("logit_lens", "positions", "image_views", "run_images", "skipped", "runs"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_b])
    con.close()
    before = _snapshot(out)
    summary = build_site(path, out)
    after = _snapshot(out)
    assert not (out / "lens" / run_dir_name(run_b)).exists()
    assert not any(rel.startswith(f"lens/{run_dir_name(run_b)}/") for rel in after)
    shared_page = f"lens/{run_dir_name(run_a)}/{shared[0]}.html"
    assert after[shared_page] != before[shared_page]
    assert run_dir_name(run_b) not in (out / shared_page).read_text(encoding="utf-8")
    kept = _lens_files(out, run_a, alone[0]) + _lens_files(out, run_a, new_image)
    assert summary.lens_pages_reused == 2 and all(after[rel] == before[rel] for rel in kept)


def test_a_damaged_manifest_renders_everything(db: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, _ = db
    out = tmp_path / "site"
    build_site(path, out)
    (out / urls.BUILD_MANIFEST).write_text("{not json", encoding="utf-8")
    assert build_site(path, out).lens_pages_reused == 0
    # A page file removed by hand is rendered again, not linked from nowhere.
    page = next((out / "lens").rglob("*.data.js"))
    os.remove(page)
    summary = build_site(path, out)
    assert summary.lens_pages_reused == 2 and page.is_file()


def test_a_manifest_cannot_link_files_from_outside_the_site(db: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, _ = db
    out = tmp_path / "site"
    build_site(path, out)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for publishing", encoding="utf-8")
    manifest_path = out / urls.BUILD_MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for record in manifest["lens"].values():
        record["files"].append("lens/../../secret.txt")
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    summary = build_site(path, out)
    assert summary.lens_pages_reused == 0
    assert not any("secret" in p.name for p in out.rglob("*"))


def test_page_summary_from_arrays_equals_the_packed_data(db: tuple[Path, dict[str, str]]) -> None:
    """write_lens_page takes the index's per-image columns from the arrays, not by unpacking
    the data file: the same numbers as _summary(data)."""
    from db.store import ResultsDB
    from report.build import ReportError
    from report.pages import lens as lens_page

    path, run_ids = db
    compared = 0
    with ResultsDB(path, read_only=True) as results:
        for run_id, image_id in results.sql("SELECT DISTINCT run_id, image_id FROM logit_lens WHERE image_id <= 102"):
            if run_id not in run_ids.values():
                continue
            summary: dict = {}
            try:
                data = lens_page.lens_data(results, run_id, image_id, summary=summary)
            except ReportError:  # an image the hostile database leaves incomplete on purpose
                continue
            assert summary == lens_page._summary(data)
            compared += 1
    assert compared >= 2


@pytest.mark.parametrize("synthetic", [False, True])
def test_object_hit_counts_equal_the_view_rule(
    db: tuple[Path, dict[str, str]], tmp_path: Path, synthetic: bool
) -> None:
    """queries.object_hit_counts (distinct tokens normalised once, only the objects' rows)
    counts what db.views.OBJECT_HITS_SELECT counts on every row: on the hostile test
    database and on two images of bench/site_scale.py's LLaVA-1.5-shaped one."""
    import importlib.util

    import pyarrow as pa

    from db import queries
    from db.store import ResultsDB
    from db.views import OBJECT_HITS_SELECT

    path = db[0]
    if synthetic:
        spec = importlib.util.spec_from_file_location(
            "site_scale", Path(__file__).parents[1] / "bench" / "site_scale.py"
        )
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        path = tmp_path / "synthetic.duckdb"
        bench.make_database(path, 2)
    compared = 0
    with ResultsDB(path, read_only=True) as results:
        for (run_id,) in results.sql("SELECT run_id FROM runs WHERE experiment = 'lens'"):
            positions = results.duck.sql(
                "SELECT DISTINCT p.image_id, a.category, p.position FROM positions p JOIN annotations a "
                f"USING (image_id) WHERE p.run_id = '{run_id}' AND p.kind = 'image'"
            ).to_arrow_table()
            table = pa.table({name: positions.column(name) for name in ("image_id", "category", "position")})
            got = sorted(queries.object_hit_counts(results, run_id, table))
            reference = results.duck.execute(
                f"""
                WITH hits AS ({OBJECT_HITS_SELECT})
                SELECT h.image_id, h.category, h.layer,
                       count(*) FILTER (WHERE h.best_rank = 1), count(*)
                FROM hits h
                JOIN (SELECT DISTINCT p.image_id, a.category, p.position FROM positions p
                      JOIN annotations a USING (image_id) WHERE p.run_id = ? AND p.kind = 'image') o
                  ON o.image_id = h.image_id AND o.category = h.category AND o.position = h.position
                WHERE h.run_id = ?
                GROUP BY ALL
                """,
                [run_id, run_id],
            ).fetchall()
            assert got == sorted((int(i), c, int(layer), int(a), int(b)) for i, c, layer, a, b in reference)
            compared += len(got)
    assert compared > 0  # some hits were counted


def test_first_top1_layers_from_the_shared_scan(tmp_path: Path) -> None:
    """object_first_top1_layers after object_hit_counts on the same object positions (in
    another order, with repeats) is answered from the first call's scan, and equals the
    view rule's first top-1 layers over every row; other positions get their own answer."""
    import pyarrow as pa
    from support.bench import site_scale

    from db import queries
    from db.store import ResultsDB
    from db.views import OBJECT_HITS_SELECT

    path = tmp_path / "synthetic.duckdb"
    site_scale().make_database(path, 3)

    def reference(results: ResultsDB, run_id: str, images: tuple[int, ...]) -> dict[int, tuple[int, int]]:
        rows = results.duck.execute(
            f"""
            WITH hits AS ({OBJECT_HITS_SELECT}),
            o AS (SELECT DISTINCT p.image_id, a.category, p.position FROM positions p
                  JOIN annotations a USING (image_id) WHERE p.run_id = ? AND p.kind = 'image'
                  AND list_contains(?::BIGINT[], p.image_id)),
            first AS (SELECT h.image_id, h.category, h.position, min(h.layer) AS first_layer FROM hits h
                      JOIN o USING (image_id, category, position) WHERE h.run_id = ? AND h.best_rank = 1 GROUP BY ALL)
            SELECT image_id, count(*), sum(first_layer) FROM first GROUP BY image_id
            """,
            [run_id, list(images), run_id],
        ).fetchall()
        return {int(i): (int(n), int(t)) for i, n, t in rows}

    with ResultsDB(path, read_only=True) as results:
        (run_id,) = results.sql("SELECT run_id FROM runs WHERE experiment = 'lens'")[0]
        positions = results.duck.sql(
            "SELECT DISTINCT p.image_id, a.category, p.position FROM positions p JOIN annotations a "
            f"USING (image_id) WHERE p.run_id = '{run_id}' AND p.kind = 'image' ORDER BY ALL"
        ).to_arrow_table()
        queries.object_hit_counts(results, run_id, positions)
        assert queries._PENDING_HITS[results]  # the first_top1 answer waits for its call
        shuffled = pa.concat_tables([positions, positions]).take(list(range(2 * positions.num_rows))[::-1])
        first = queries.object_first_top1_layers(results, run_id, shuffled)
        assert not queries._PENDING_HITS[results]  # given once, then dropped
        images = tuple(sorted({int(i) for i in positions.column("image_id").to_pylist()}))
        assert first == reference(results, run_id, images) and sum(n for n, _ in first.values()) > 0
        subset = positions.filter(pa.compute.equal(positions.column("image_id"), images[0]))
        assert queries.object_first_top1_layers(results, run_id, subset) == reference(results, run_id, images[:1])


def test_first_token_hit_rule_counts_the_class_token_ids(tmp_path: Path) -> None:
    """object_hit_counts(..., "first_token") counts the object positions whose lens token id
    is the category's class token: checked against a count over the raw rows in Python, on
    bench/site_scale.py's LLaVA-1.5-shaped database with class tokens chosen by hand (the
    top-1 id at one object position of each image, so that hits exist)."""
    from collections import defaultdict

    import duckdb
    import pyarrow as pa
    from support.bench import site_scale

    from db import queries
    from db.store import ResultsDB

    bench = site_scale()
    path = tmp_path / "synthetic.duckdb"
    bench.make_database(path, 2)
    with duckdb.connect(str(path)) as con:
        (run_id,) = con.execute("SELECT run_id FROM runs WHERE experiment = 'lens'").fetchone()
        objects = con.execute(
            "SELECT DISTINCT p.image_id, a.category, p.position FROM positions p JOIN annotations a USING (image_id) "
            "WHERE p.run_id = ? AND p.kind = 'image' ORDER BY ALL",
            [run_id],
        ).fetchall()
        chosen: dict[tuple[int, str], int] = {}
        for image_id, category, position in objects:
            if (image_id, category) not in chosen:
                (token_id,) = con.execute(
                    "SELECT token_id FROM logit_lens WHERE run_id = ? AND image_id = ? AND position = ? "
                    "AND rank = 1 ORDER BY layer DESC LIMIT 1",
                    [run_id, image_id, position],
                ).fetchone()
                chosen[(image_id, category)] = int(token_id)
        con.executemany(
            "INSERT INTO class_tokens VALUES (?, ?, ?, ?, NULL)",
            [(run_id, i, c, t) for (i, c), t in chosen.items()],
        )
        # The reference: every lens row of every object position, counted here.
        best: dict[tuple[int, str, int, int], int] = {}
        for image_id, category, position in objects:
            rows = con.execute(
                "SELECT layer, rank, token_id FROM logit_lens WHERE run_id = ? AND image_id = ? AND position = ?",
                [run_id, image_id, position],
            ).fetchall()
            for layer, rank, token_id in rows:
                if token_id == chosen[(image_id, category)]:
                    key = (image_id, category, int(layer), position)
                    best[key] = min(best.get(key, rank), rank)
    expected: dict[tuple[int, str, int], list[int]] = defaultdict(lambda: [0, 0])
    for (image_id, category, layer, _), rank in best.items():
        expected[(image_id, category, layer)][0] += rank == 1
        expected[(image_id, category, layer)][1] += 1
    table = pa.table(
        {
            "image_id": pa.array([o[0] for o in objects], pa.int64()),
            "category": pa.array([o[1] for o in objects], pa.string()),
            "position": pa.array([o[2] for o in objects], pa.int32()),
        }
    )
    with ResultsDB(path, read_only=True) as results:
        got = sorted(queries.object_hit_counts(results, run_id, table, "first_token"))
        assert queries.runs_with_class_tokens(results) == {run_id}
    assert got == sorted((i, c, layer, n1, nk) for (i, c, layer), (n1, nk) in expected.items())
    assert sum(n1 for *_, n1, _ in got) >= len(chosen)  # the chosen cells themselves are top-1 hits
    from report.build import build_site

    build_site(path, tmp_path / "site", downloads=False, hit_rule="first_token")
    page = (tmp_path / "site" / "quantitative.html").read_text(encoding="utf-8")
    assert "hit rule <code>first_token</code>" in page and "hit rule <code>word</code>" not in page


def test_report_build_hit_rule_option(db: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """--hit-rule first_token on lens runs without class tokens is one line and exit 1, and
    nothing is written; --hit-rule word names its rule on the quantitative page."""
    from click.testing import CliRunner

    from report.cli import report

    out = tmp_path / "site"
    refused = CliRunner().invoke(report, ["build", "--db", str(db[0]), "--out", str(out), "--hit-rule", "first_token"])
    assert refused.exit_code == 1, refused.output
    assert "first_token hit rule cannot be applied" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert not (out / "index.html").exists()
