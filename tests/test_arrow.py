"""Arrow schemas derived from db/schema.py, and the check every row batch passes before it is written."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
import torch

from collector.adapters import ImageTokenLayout
from collector.tables import run_image_marker
from db import schema
from db.arrow import RowBatchError, arrow_schema, required_columns, table_from_columns, table_from_rows, validate
from db.store import ResultsDB

# DuckDB's own Arrow type of each SQL type the schema uses (what `SELECT ... LIMIT 0` returns).
DUCKDB_FLOAT = pa.float32()  # sa.Float without precision is DuckDB FLOAT


def _duckdb_schema(db: ResultsDB, table: str) -> pa.Schema:
    return db.duck.sql(f"SELECT * FROM {table} LIMIT 0").to_arrow_table().schema


def test_every_table_matches_what_duckdb_stores(tmp_path):
    """Each derived type is DuckDB's type of the migrated column; Float columns travel as float64
    (the collector computes in float64) and DuckDB rounds them to its 32-bit FLOAT."""
    with ResultsDB(tmp_path / "r.duckdb") as db:
        for name, table in schema.metadata.tables.items():
            derived = arrow_schema(name)
            stored = _duckdb_schema(db, name)
            assert derived.names == [column.name for column in table.columns] == stored.names, name
            for field in derived:
                stored_type = stored.field(field.name).type
                if stored_type == DUCKDB_FLOAT:
                    assert field.type == pa.float64(), (name, field.name)
                elif pa.types.is_list(stored_type) and stored_type.value_type == DUCKDB_FLOAT:
                    assert field.type == pa.list_(pa.float64()), (name, field.name)
                else:
                    assert field.type == stored_type, (name, field.name, field.type, stored_type)


def test_types_equal_the_former_hand_written_ones():
    """The Arrow types collector/tables.py and the experiments used to spell out by hand."""
    expected = {
        "positions": {
            "run_id": pa.string(),
            "image_id": pa.int64(),
            "position": pa.int32(),
            "kind": pa.string(),
            "patch_row": pa.int32(),
            "patch_col": pa.int32(),
            "label": pa.string(),
            "token_id": pa.int32(),
        },
        "logit_lens": {
            "run_id": pa.string(),
            "image_id": pa.int64(),
            "layer": pa.int16(),
            "position": pa.int32(),
            "rank": pa.int16(),
            "token_id": pa.int32(),
            "token": pa.string(),
            "prob": pa.float64(),
        },
        "run_images": {
            "run_id": pa.string(),
            "image_id": pa.int64(),
            "n_positions": pa.int32(),
            "n_layers": pa.int32(),
            "grid_rows": pa.int32(),
            "grid_cols": pa.int32(),
            "written_at": pa.timestamp("us"),
        },
        "blocking": {
            "run_id": pa.string(),
            "image_id": pa.int64(),
            "category": pa.string(),
            "source": pa.string(),
            "target": pa.string(),
            "layer_start": pa.int32(),
            "layer_end": pa.int32(),
            "window_kind": pa.string(),
            "preset": pa.string(),
            "correct": pa.bool_(),
            "question": pa.string(),
            "predicted_token": pa.string(),
            "predicted_prob": pa.float64(),
            "target_token": pa.string(),
            "target_prob": pa.float64(),
            "source_positions": pa.list_(pa.int32()),
            "target_positions": pa.list_(pa.int32()),
        },
        "ablations": {
            "positions": pa.list_(pa.int32()),
            "n_ablated": pa.int32(),
            "correct": pa.bool_(),
            "seed": pa.int64(),
            "predicted_prob": pa.float64(),
        },
        "extra_views": {"png": pa.binary(), "view_width": pa.int32(), "grid_cols": pa.int32()},
        "skipped": {"run_id": pa.string(), "image_id": pa.int64(), "reason": pa.string(), "detail": pa.string()},
    }
    for table, columns in expected.items():
        derived = arrow_schema(table)
        assert {name: derived.field(name).type for name in columns} == columns, table


def test_nullability_follows_the_declarations():
    assert set(required_columns("positions")) == {"run_id", "image_id", "position", "kind", "label", "token_id"}
    assert set(required_columns("skipped")) == {"run_id", "image_id", "reason"}
    assert "n_layers" not in required_columns("run_images")


def test_builders_convert_to_the_schema_types():
    table = table_from_columns("skipped", {"run_id": ["r"], "image_id": [7], "reason": ["grayscale"], "detail": [None]})
    assert table.schema.field("image_id").type == pa.int64() and table.column("detail").to_pylist() == [None]
    rows = table_from_rows(
        "blocking",
        [
            {
                "run_id": "r",
                "image_id": 1,
                "category": "cat",
                "source": "none",
                "target": "none",
                "window_kind": "baseline",
                "correct": True,
            },
            {
                "run_id": "r",
                "image_id": 1,
                "category": "cat",
                "source": "object_1",
                "target": "last",
                "window_kind": "sliding",
                "correct": False,
                "layer_start": 0,
                "layer_end": 2,
                "source_positions": [5, 6],
            },
        ],
    )
    assert rows.column("layer_start").to_pylist() == [None, 0]
    assert rows.column("source_positions").to_pylist() == [None, [5, 6]]
    assert rows.schema.field("source_positions").type == pa.list_(pa.int32())
    # dictionary-encoded text decodes to plain strings
    tokens = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), pa.array(["a", "b"]))
    lens = table_from_columns(
        "logit_lens",
        {
            "run_id": ["r"] * 3,
            "image_id": [1] * 3,
            "layer": [0, 0, 1],
            "position": [0, 1, 0],
            "rank": [1] * 3,
            "token_id": [3, 4, 3],
            "token": tokens,
            "prob": [0.5, 0.25, 0.125],
        },
    )
    assert lens.column("token").type == pa.string() and lens.column("token").to_pylist() == ["a", "b", "a"]


@pytest.mark.parametrize(
    "table, columns, message",
    [
        ("nope", {"run_id": ["r"]}, "unknown table"),
        ("skipped", {"run_id": ["r"], "image_id": [1], "reason": ["x"], "colour": ["red"]}, "unknown columns"),
        ("skipped", {"run_id": ["r"], "image_id": [1]}, "missing NOT NULL columns"),
        ("skipped", {"run_id": ["r"], "image_id": [None], "reason": ["x"]}, "nulls in a NOT NULL column"),
        ("skipped", {"run_id": ["r"], "image_id": ["one"], "reason": ["x"]}, r"skipped\.image_id"),
    ],
)
def test_bad_batches_are_refused(table, columns, message):
    with pytest.raises(RowBatchError, match=message):
        table_from_columns(table, columns)
    if table != "nope":  # the same batch built outside the builders is refused by validate
        with pytest.raises(RowBatchError, match=message):
            validate(table, pa.table({name: pa.array(values) for name, values in columns.items()}))


def test_validate_casts_a_castable_batch():
    batch = pa.table({"run_id": ["r"], "image_id": pa.array([3], pa.int32()), "reason": ["x"]})
    checked = validate("skipped", batch)
    assert checked.schema.field("image_id").type == pa.int64() and checked.column("image_id").to_pylist() == [3]


def _marker(image_id: int) -> pa.Table:
    return run_image_marker("r", image_id, 4, ImageTokenLayout.row_major(torch.arange(4), 2, 2), None)


def test_the_store_validates_inside_the_image_transaction(tmp_path):
    """A bad batch after a good one rolls the whole image back: nothing of it is written."""
    bad = pa.table({"run_id": ["r"], "image_id": pa.array([1], pa.int64()), "reason": pa.array([None], pa.string())})
    with ResultsDB(tmp_path / "r.duckdb") as db:
        with pytest.raises(RowBatchError, match="skipped.reason"):
            db.write_image_results("r", 1, {"run_images": _marker(1), "skipped": bad})
        assert db.completed_images("r") == set()
        assert db.sql("SELECT count(*) FROM skipped")[0][0] == 0
        db.write_image_results("r", 1, {"run_images": _marker(1)})
        assert db.completed_images("r") == {1}
        written_at = db.sql("SELECT written_at FROM run_images")[0][0]
    assert isinstance(written_at, dt.datetime)
