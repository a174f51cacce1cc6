"""Arrow schemas derived from `db.schema`, and the check every row batch passes before it is written.

`db.schema` declares each column once (SQLAlchemy Core). Bulk rows travel as Arrow tables
(DuckDB inserts them natively), so their Arrow types are derived here from those
declarations instead of being written a second time by hand:

| SQLAlchemy             | Arrow                   |
|------------------------|-------------------------|
| String                 | string                  |
| SmallInteger           | int16                   |
| Integer                | int32                   |
| BigInteger             | int64                   |
| Float                  | float64 (DuckDB stores a plain Float as 32-bit FLOAT and rounds on insert) |
| Boolean                | bool                    |
| DateTime               | timestamp[us] (naive, UTC by convention) |
| LargeBinary            | binary                  |
| JSON                   | string (the JSON text)  |
| ARRAY(T)               | list<T>                 |

`table_from_columns` / `table_from_rows` build a table of one schema table's columns;
`validate` checks a batch from anywhere (column names known, values castable to the
column's type, no nulls where the column is NOT NULL) and returns it cast to the schema.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from db import schema


class RowBatchError(ValueError):
    """A row batch that does not fit its table's schema (a programming error, not a user one)."""


def arrow_type(column_type: sa.types.TypeEngine) -> pa.DataType:
    """The Arrow type of a SQLAlchemy column type (see the module table)."""
    # Subclasses before their bases: SmallInteger and BigInteger are Integers.
    if isinstance(column_type, sa.ARRAY):
        return pa.list_(arrow_type(column_type.item_type))
    if isinstance(column_type, sa.SmallInteger):
        return pa.int16()
    if isinstance(column_type, sa.BigInteger):
        return pa.int64()
    if isinstance(column_type, sa.Integer):
        return pa.int32()
    if isinstance(column_type, sa.Float):
        return pa.float64()
    if isinstance(column_type, sa.Boolean):
        return pa.bool_()
    if isinstance(column_type, sa.DateTime):
        return pa.timestamp("us")
    if isinstance(column_type, sa.LargeBinary):
        return pa.binary()
    if isinstance(column_type, (sa.JSON, sa.String)):
        return pa.string()
    raise TypeError(f"no Arrow type for column type {column_type!r}")


def _table(name: str) -> sa.Table:
    try:
        return schema.metadata.tables[name]
    except KeyError:
        raise RowBatchError(f"unknown table {name!r}") from None


@functools.cache
def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema of table `name`: every column in declaration order, nullability as declared."""
    return pa.schema(
        [
            pa.field(column.name, arrow_type(column.type), nullable=bool(column.nullable))
            for column in _table(name).columns
        ]
    )


def required_columns(name: str) -> tuple[str, ...]:
    """Columns of `name` declared NOT NULL (primary-key columns included)."""
    return tuple(field.name for field in arrow_schema(name) if not field.nullable)


def _array(values: Any, type_: pa.DataType) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks().cast(type_)
    if isinstance(values, pa.Array):
        return values.cast(type_)
    return pa.array(values, type_)


def table_from_columns(name: str, columns: Mapping[str, Any]) -> pa.Table:
    """An Arrow table of schema table `name` from column values (lists, numpy arrays or Arrow arrays).

    Only the given columns are built (the database fills the rest with NULL); each is
    converted to its schema type. The result is validated (`validate`).
    """
    fields = {field.name: field for field in arrow_schema(name)}
    unknown = [column for column in columns if column not in fields]
    if unknown:
        raise RowBatchError(f"{name}: unknown columns {unknown}")
    arrays = []
    for column, values in columns.items():
        try:
            arrays.append(_array(values, fields[column].type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as error:
            raise RowBatchError(f"{name}.{column}: {error}") from None
    return validate(name, pa.Table.from_arrays(arrays, names=list(columns)))


def table_from_rows(name: str, rows: Sequence[Mapping[str, Any]], columns: Iterable[str] | None = None) -> pa.Table:
    """An Arrow table of schema table `name` from row dicts.

    `columns` (default: every column of the table that some row has) are taken from
    each row, a missing key reading as NULL.
    """
    if columns is None:
        present = {key for row in rows for key in row}
        columns = [field.name for field in arrow_schema(name) if field.name in present]
    return table_from_columns(name, {column: [row.get(column) for row in rows] for column in columns})


def validate(name: str, table: pa.Table) -> pa.Table:
    """`table` checked against schema table `name`, cast to its Arrow types.

    Raises RowBatchError when a column is unknown, a column cannot be cast to its type,
    a NOT NULL column is missing, or a NOT NULL column holds a null.
    """
    fields = {field.name: field for field in arrow_schema(name)}
    unknown = [column for column in table.column_names if column not in fields]
    if unknown:
        raise RowBatchError(f"{name}: unknown columns {unknown}")
    missing = [column for column in required_columns(name) if column not in table.column_names]
    if missing:
        raise RowBatchError(f"{name}: missing NOT NULL columns {missing}")
    target = pa.schema([fields[column] for column in table.column_names])
    columns = []
    for column, field in zip(table.column_names, target):
        values = table.column(column)
        if not field.nullable and values.null_count:
            raise RowBatchError(f"{name}.{column}: {values.null_count} nulls in a NOT NULL column")
        try:
            columns.append(values.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise RowBatchError(f"{name}.{column}: cannot cast {values.type} to {field.type}: {error}") from None
    return pa.Table.from_arrays(columns, schema=target)
