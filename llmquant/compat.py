"""The one module that reaches into transformers' internals.

llmquant's own checkpoint format plugs into transformers' quantizer hooks and weight
conversions, and the streamed reader follows transformers' renamings of checkpoint keys.
Those are not public API: they change between releases. Everything else in llmquant uses
transformers' public API only (the quantizer-registration API ``import llmquant`` uses,
``HfQuantizer`` and ``register_quantizer``, is reached here too), so ``import llmquant`` and commands that never touch the
llmquant format (``llmquant eval`` of a float model, ``inspect``, ``init``) keep working
when an internal moves; where one is needed and missing, the error is one line naming
the versions llmquant is tested with.
"""

from __future__ import annotations

import importlib

from .errors import UserError

# The oldest and newest transformers the compatibility tests run under (pyproject.toml allows this range).
OLDEST = "5.17"
NEWEST = "5.25"
REQUIREMENT = f"transformers>={OLDEST},<{NEWEST.split('.')[0]}.{int(NEWEST.split('.')[1]) + 1}"


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _minor(v: str) -> tuple[int, int]:
    parts = v.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def tested(version: str | None = None) -> bool:
    """Whether this transformers release is within the range the compatibility tests run under."""
    v = _minor(version or transformers_version())
    return _minor(OLDEST) <= v <= _minor(NEWEST)


def drift_message(what: str, version: str | None = None) -> str:
    v = version or transformers_version()
    return (f"transformers {v} has no {what}, which llmquant needs for its own checkpoint format; llmquant is "
            f"tested with transformers {OLDEST} to {NEWEST}: pip install '{REQUIREMENT}'")


def version_note() -> str | None:
    """One line for commands that use transformers' internals, when this release is outside the tested range."""
    v = transformers_version()
    if tested(v):
        return None
    return (f"note: transformers {v} is outside the range llmquant is tested with ({OLDEST} to {NEWEST}); "
            f"llmquant's checkpoint format may not load")


def internal(path: str):
    """``internal("transformers.core_model_loading:WeightConverter")``: the object, or a one-line UserError."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UserError(drift_message(f"{module}.{name}")) from None
