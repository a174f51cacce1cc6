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


def test_token_pieces_are_written_once_per_run_and_token(tmp_path):
    """`token_pieces` rows shared by a run's images: a token id an earlier image wrote is not
    written again (one row per (run, token id)); another run keeps its own rows."""
    import pyarrow as pa

    from collector.tables import token_pieces_table

    def marker(run_id: str, image_id: int) -> pa.Table:
        import datetime as dt

        return pa.table(
            {
                "run_id": [run_id],
                "image_id": pa.array([image_id], pa.int64()),
                "n_positions": [0],
                "grid_rows": [0],
                "grid_cols": [0],
                "written_at": [dt.datetime(2025, 1, 1)],
            }
        )

    with ResultsDB(tmp_path / "r.duckdb") as db:
        runs = [db.start_run("lens", "m", {"model_id": "m", "n": n}, {"model_id": "m"}) for n in (1, 2)]
        first = {29871: "", 13: "\n"}
        second = {13: "\n", 278: "the"}
        pieces = {29871: "\u2581", 13: "<0x0A>", 278: "\u2581the"}
        db.write_image_results(
            runs[0], 1, {"token_pieces": token_pieces_table(runs[0], first, pieces), "run_images": marker(runs[0], 1)}
        )
        db.write_image_results(
            runs[0], 2, {"token_pieces": token_pieces_table(runs[0], second, pieces), "run_images": marker(runs[0], 2)}
        )
        db.write_image_results(
            runs[1], 1, {"token_pieces": token_pieces_table(runs[1], second, pieces), "run_images": marker(runs[1], 1)}
        )
        rows = db.sql("SELECT run_id, token_id, piece, text FROM token_pieces ORDER BY run_id = ? DESC, 2", (runs[0],))
    assert rows == [
        (runs[0], 13, "<0x0A>", "\n"),
        (runs[0], 278, "\u2581the", "the"),
        (runs[0], 29871, "\u2581", ""),
        (runs[1], 13, "<0x0A>", "\n"),
        (runs[1], 278, "\u2581the", "the"),
    ]


def test_a_version_8_database_gains_token_pieces(tmp_path):
    path = tmp_path / "v8.duckdb"
    with ResultsDB(path) as db:
        db.sql("DROP TABLE token_pieces")
        db.sql("DELETE FROM schema_migrations WHERE version > 8")
    with ResultsDB(path) as db:
        assert db.sql("SELECT max(version) FROM schema_migrations")[0][0] == LATEST_VERSION >= 9
        assert db.sql("SELECT count(*) FROM token_pieces")[0][0] == 0


def test_lens_collection_stores_the_real_tokenizers_pieces(tmp_path, loaded_models, demo_images):
    """With the real LLaVA-1.5 tokenizer: every token id a lens run names (lens cells and input
    positions) has one `token_pieces` row whose piece is the tokenizer's own
    convert_ids_to_tokens and whose text is the lens rows' decoded text; the prompt's lone
    word marker 29871 is the piece '\u2581' with empty text."""
    if "llava-1.5-real-config" not in loaded_models:
        pytest.skip("needs ../shared/data/real_configs (the real LLaVA-1.5 tokenizer)")
    loaded = loaded_models["llava-1.5-real-config"]
    image_dir, annotation_file = demo_images
    records = folder_images(image_dir, annotation_file)[:2]
    with ResultsDB(tmp_path / "r.duckdb") as db:
        summary = collect_lens(loaded, records, db, prompt="Describe:\n the image.", top_k=5, progress=False)
        pieces = dict(db.sql("SELECT token_id, piece FROM token_pieces WHERE run_id = ?", (summary.run_id,)))
        texts = dict(db.sql("SELECT token_id, text FROM token_pieces WHERE run_id = ?", (summary.run_id,)))
        named = {
            row[0]
            for row in db.sql(
                "SELECT token_id FROM logit_lens WHERE run_id = ? UNION SELECT token_id FROM positions WHERE run_id = ?",
                (summary.run_id, summary.run_id),
            )
        }
        lens_text = dict(db.sql("SELECT DISTINCT token_id, token FROM logit_lens WHERE run_id = ?", (summary.run_id,)))
        n_rows = db.sql("SELECT count(*) FROM token_pieces")[0][0]
        input_ids = {row[0] for row in db.sql("SELECT token_id FROM positions WHERE run_id = ?", (summary.run_id,))}
    tokenizer = loaded.adapter.tokenizer
    assert set(pieces) == named and n_rows == len(named)
    ids = sorted(named)
    reference = tokenizer.convert_ids_to_tokens(ids)
    assert [pieces[i] for i in ids] == [p if p is not None else "" for p in reference]
    assert all(texts[i] == text for i, text in lens_text.items())
    assert 29871 in input_ids and (pieces[29871], texts[29871]) == ("\u2581", "")
    assert 13 in input_ids and (pieces[13], texts[13]) == ("<0x0A>", "\n")
