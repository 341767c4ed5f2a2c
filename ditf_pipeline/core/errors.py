"""One exception type for every problem the user can fix.

The CLI turns a `DitfError` into a single line on stderr and a non-zero exit; anything else is a
bug and keeps its traceback. `unknown` builds the error for a mistyped name (with "did you
mean"), so every stage words it the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class DitfError(Exception):
    """A user-facing error: bad path, corrupt input, unknown name, conflicting store."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(what: str, value: str, choices: Sequence[str], plural: str | None = None) -> DitfError:
    """The error for a name that is not one of `choices`: value, suggestion, every choice."""
    return DitfError(f"unknown {what} {value!r}{did_you_mean(value, choices)}; "
                     f"known {plural or what + 's'}: {', '.join(choices)}")
