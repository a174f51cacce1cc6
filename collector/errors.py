"""User-facing errors: shown by the CLI as one line, with a non-zero exit, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (path, model id, option value)."""
