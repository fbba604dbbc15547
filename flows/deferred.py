"""Import-time work of third-party modules that a command defers to the first call that needs it."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

_IRI = "rfc3987_syntax"


def defer_iri_grammar() -> None:
    """Build jsonschema's IRI grammar on the first IRI checked, not when Prefect imports jsonschema.

    jsonschema imports `rfc3987_syntax` for its "iri" formats, and that module compiles an Earley parser
    of RFC 3987 at import: 1.5 CPU-s (4 s wall on two busy cores) on every command, while gradlake's
    schemas hold no IRI.  A stand-in module takes its place until then: `is_valid_syntax` (all jsonschema
    uses) and every other name load the real one on first use, so each check gives the same answer."""
    if _IRI in sys.modules:
        return
    found = importlib.util.find_spec(_IRI)
    if found is None or not found.submodule_search_locations:
        return
    stand_in = types.ModuleType(_IRI)
    stand_in.__spec__, stand_in.__file__ = found, found.origin  # what inspect and torch ask every module, answered here
    stand_in.__path__ = list(found.submodule_search_locations)  # its submodules load from the real package

    def is_valid_syntax(term: str, value: str) -> bool:
        return _helpers().is_valid_syntax(term, value)

    stand_in.is_valid_syntax = is_valid_syntax
    stand_in.__getattr__ = _forwarded
    sys.modules[_IRI] = stand_in


def _forwarded(name: str) -> Any:
    if name.startswith("__"):  # probes of every module in sys.modules (hasattr(m, "__loader__"), ...) load nothing
        raise AttributeError(name)
    return getattr(_helpers(), name)


def _helpers() -> Any:
    return importlib.import_module(f"{_IRI}.syntax_helpers")
