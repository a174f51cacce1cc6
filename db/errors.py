"""Errors the database layer raises for user-facing problems (shown as one line by the CLI)."""


class DatabaseError(Exception):
    """A database file that cannot be used as asked (newer schema, not a DuckDB file, locked)."""


def disk_full(error: BaseException) -> bool:
    """Whether an error (an OSError, or a DuckDB error wrapping one) says the disk is full."""
    import errno

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if "no space left on device" in text or "disk quota exceeded" in text or "disk is full" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
