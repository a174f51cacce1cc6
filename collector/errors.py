"""User-facing errors: shown by the CLI as one line, with a non-zero exit, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (path, model id, option value)."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (library errors can span pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
