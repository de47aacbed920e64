"""User-facing errors: each names the problem and the fix; the CLI prints them without a traceback.

Every error a user can cause (bad files, arguments, models, run folders) is an `InputError` or a
subclass, so one `except InputError` catches them all; the subclasses let callers single out a case.
"""


class InputError(ValueError):
    """Bad input data or arguments (missing file, malformed record, empty text, too long, ...)."""


class UnsupportedModelError(InputError):
    """The model's architecture cannot be split into H_{l-1} + A_l + F_l = H_l."""


class RunBusyError(InputError):
    """Another process holds the lock of a run folder (two runs must never write one folder at once)."""
