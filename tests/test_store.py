"""The results database: migrations, atomic per-image writes, resumable runs."""

from __future__ import annotations

import duckdb
import pytest

from collector.images import folder_images
from collector.lens.experiment import collect_lens
from db.errors import DatabaseError
from db.migrations import LATEST_VERSION, MIGRATIONS
from db.store import ResultsDB


def test_migrations_are_recorded_once(tmp_path):
    path = tmp_path / "r.duckdb"
    with ResultsDB(path) as db:
        assert [row[0] for row in db.sql("SELECT version FROM schema_migrations ORDER BY 1")] == [
            m.version for m in MIGRATIONS
        ]
    with ResultsDB(path) as db:
        assert db.sql("SELECT count(*) FROM schema_migrations")[0][0] == len(MIGRATIONS)
        tables = {row[0] for row in db.sql("SELECT table_name FROM information_schema.tables")}
        assert {"runs", "images", "positions", "logit_lens", "lens_top1"} <= tables


def test_older_database_is_migrated(tmp_path):
    path = tmp_path / "old.duckdb"
    with ResultsDB(path) as db:
        # Make it a version-1 file: what migration 2 (and later ones) added is gone.
        db.sql("DROP VIEW lens_top1")
        db.sql("DELETE FROM schema_migrations WHERE version > 1")
    with pytest.raises(DatabaseError, match="older"):
        ResultsDB(path, read_only=True)
    with ResultsDB(path) as db:
        assert db.sql("SELECT max(version) FROM schema_migrations")[0][0] == LATEST_VERSION
        assert db.sql("SELECT count(*) FROM lens_top1")[0][0] == 0


def test_newer_database_is_refused_untouched(tmp_path):
    path = tmp_path / "new.duckdb"
    with ResultsDB(path):
        pass
    connection = duckdb.connect(str(path))
    connection.execute(
        "INSERT INTO schema_migrations VALUES (?, 'from the future', now()::TIMESTAMP, '99')",
        [LATEST_VERSION + 1],
    )
    connection.close()
    for read_only in (False, True):
        with pytest.raises(DatabaseError, match="newer"):
            ResultsDB(path, read_only=read_only)
    connection = duckdb.connect(str(path), read_only=True)
    assert connection.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == LATEST_VERSION + 1
    connection.close()


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DatabaseError, match="cannot open database"):
        ResultsDB(path)
    with pytest.raises(DatabaseError, match="not found"):
        ResultsDB(tmp_path / "missing.duckdb", read_only=True)


def test_same_identity_reopens_the_run(tmp_path):
    with ResultsDB(tmp_path / "r.duckdb") as db:
        first = db.start_run("lens", "m", {"prompt": "a"}, {"prompt": "a"})
        assert db.start_run("lens", "m", {"prompt": "a"}, {"prompt": "a", "device": "cuda"}) == first
        assert db.start_run("lens", "m", {"prompt": "b"}, {"prompt": "b"}) != first


class _InterruptAfterFirstTable(dict):
    """Tables whose iteration is interrupted after the first insert, mid-transaction."""

    def items(self):
        for number, item in enumerate(super().items()):
            if number == 1:
                raise KeyboardInterrupt
            yield item


def _table_rows(db: ResultsDB, table: str) -> list[tuple]:
    columns = {
        "run_images": "run_id, image_id, n_positions, n_layers, grid_rows, grid_cols",
        "image_views": "run_id, image_id, png, view_width, view_height, scale_x, scale_y, offset_x, offset_y",
    }.get(table, "*")
    return db.sql(f"SELECT {columns} FROM {table} ORDER BY ALL")


@pytest.mark.slow  # three collections of the same images
def test_interrupted_run_resumes_to_the_same_rows(tmp_path, loaded_models, demo_images, monkeypatch):
    loaded = loaded_models["llava-1.5"]
    image_dir, annotation_file = demo_images
    records = folder_images(image_dir, annotation_file)
    assert len(records) >= 3

    with ResultsDB(tmp_path / "straight.duckdb") as straight:
        collect_lens(loaded, records, straight, top_k=3, progress=False)
        expected = {
            t: _table_rows(straight, t) for t in ("positions", "logit_lens", "image_views", "run_images", "images")
        }
        assert straight.sql("SELECT count(*) FROM extra_views")[0][0] == 0  # LLaVA-1.5: the base view only

    interrupted_path = tmp_path / "interrupted.duckdb"
    import collector.lens.experiment as module

    real_one_image = module.lens_one_image
    calls = {"n": 0}

    def interrupt_on_third_image(*args, **kwargs):
        tables = real_one_image(*args, **kwargs)
        calls["n"] += 1
        return _InterruptAfterFirstTable(tables) if calls["n"] == 3 else tables

    monkeypatch.setattr(module, "lens_one_image", interrupt_on_third_image)
    with ResultsDB(interrupted_path) as db:
        with pytest.raises(KeyboardInterrupt):
            collect_lens(loaded, records, db, top_k=3, progress=False)
        run_id = db.runs()[0]["run_id"]
        assert db.runs()[0]["status"] == "interrupted"
        assert db.completed_images(run_id) == {r.image_id for r in records[:2]}
        # Nothing of the third image was left half-written.
        third = records[2].image_id
        for table in ("positions", "logit_lens", "image_views", "run_images"):
            assert db.sql(f"SELECT count(*) FROM {table} WHERE image_id = ?", [third])[0][0] == 0
    monkeypatch.setattr(module, "lens_one_image", real_one_image)

    with ResultsDB(interrupted_path) as db:
        summary = collect_lens(loaded, records, db, top_k=3, progress=False)
        assert (summary.images_already_complete, summary.images_written) == (2, len(records) - 2)
        assert summary.run_id == run_id
        actual = {t: _table_rows(db, t) for t in expected}
        assert db.runs()[0]["status"] == "complete"
    for table in expected:
        assert actual[table] == expected[table], table

    # A third invocation has nothing left to do and duplicates nothing.
    with ResultsDB(interrupted_path) as db:
        summary = collect_lens(loaded, records, db, top_k=3, progress=False)
        assert summary.images_written == 0
        assert _table_rows(db, "logit_lens") == expected["logit_lens"]


def test_lens_rows_match_the_lens_readout(tmp_path, loaded_models, demo_images):
    """What lands in SQL is what the lens computed: same ids, probabilities, positions."""
    import torch

    from collector.lens import LogitLens

    loaded = loaded_models["llava-phi"]
    image_dir, annotation_file = demo_images
    record = folder_images(image_dir, annotation_file)[1]
    with ResultsDB(tmp_path / "r.duckdb") as db:
        summary = collect_lens(loaded, [record], db, prompt="What is it?", top_k=4, progress=False)
        rows = db.duck.execute(
            "SELECT layer, position, rank, token_id, prob FROM logit_lens ORDER BY layer, position, rank"
        ).fetchnumpy()
        kinds = db.sql("SELECT kind, count(*), min(position), max(position) FROM positions GROUP BY kind ORDER BY kind")
        n_rows = db.sql("SELECT count(*) FROM logit_lens")[0][0]
        corner = db.sql(
            "SELECT position, label FROM positions WHERE run_id = ? AND patch_row = 23 AND patch_col = 23",
            [summary.run_id],
        )
    inputs = loaded.adapter.build_inputs(record.load(), "What is it?")
    with torch.no_grad():
        outputs = loaded.model(**inputs, output_hidden_states=True)
    readout = LogitLens(loaded.adapter).top_k(outputs.hidden_states, 4)
    layout = loaded.adapter.image_token_layout(inputs["input_ids"][0], inputs)
    n_layers, n_positions, _ = readout.token_ids.shape
    assert n_rows == n_layers * n_positions * 4
    assert (rows["token_id"] == readout.token_ids.reshape(-1).numpy()).all()
    assert abs(rows["prob"] - readout.probs.reshape(-1).numpy()).max() < 1e-6
    assert kinds[0][:2] == ("image", 576) and kinds[0][2] == int(layout.positions[0])
    assert kinds[1] == ("text", n_positions - 576, 0, n_positions - 1)
    assert corner == [(layout.position_of(23, 23), "<IMG576>")]
