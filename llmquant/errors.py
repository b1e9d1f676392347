"""Errors a user can cause.

Anything raised as :class:`UserError` is printed by the command line as one line
(``error: ...``) with no traceback: the message must name the bad value and what
is allowed instead.
"""


class UserError(ValueError):
    """Bad input: a recipe, a command line, a path or a checkpoint the user gave us."""


class ExportCheckError(RuntimeError):
    """A written checkpoint did not reload to the model it was written from."""


class PeerError(RuntimeError):
    """In a run over several processes, a collective that did not complete: another process stopped, or did not come
    within the process group's timeout."""


def read_utf8(path, what: str) -> str:
    """A user's text file (a recipe, a calibration text), with one-line errors for unreadable ones."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
