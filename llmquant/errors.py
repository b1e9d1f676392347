"""Errors a user can cause.

Anything raised as :class:`UserError` is printed by the command line as one line
(``error: ...``) with no traceback: the message must name the bad value and what
is allowed instead.
"""


class UserError(ValueError):
    """Bad input: a recipe, a command line, a path or a checkpoint the user gave us."""


class ExportCheckError(RuntimeError):
    """A written checkpoint did not reload to the model it was written from."""
