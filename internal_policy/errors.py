"""User-facing errors: each names the problem and the fix; the CLI prints them without a traceback."""


class InputError(ValueError):
    """Bad input data or arguments (missing file, malformed record, empty text, too long, ...)."""
