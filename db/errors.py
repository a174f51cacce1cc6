"""Errors the database layer raises for user-facing problems (shown as one line by the CLI)."""


class DatabaseError(Exception):
    """A database file that cannot be used as asked (newer schema, not a DuckDB file, locked)."""
