"""How a failure inside the store becomes one error line (`DitfError`), never a traceback.

Writes and reads of the store's methods are wrapped here: an OS-level write failure (disk full,
read-only, permissions) names the store and promises that committed data is intact; a node that
cannot be read (corrupt metadata, a damaged chunk) names the node and the repair command.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from ..core.errors import DitfError

Method = TypeVar("Method", bound=Callable[..., Any])


def reason(exc: BaseException) -> str:
    """The first line of an exception, with its type: short enough for one error line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def writes(method: Method) -> Method:
    """Turn an OS-level write failure (disk full, read-only, permissions) into one clear line.

    Whatever was committed before stays readable: chunks are written atomically and an image
    is committed only by its `complete` flag, so a failed write leaves at most an uncommitted
    image behind.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            where = getattr(self, "path", None) or getattr(getattr(self, "group", None), "store_path", "the store")
            cause = exc.strerror or str(exc)
            raise DitfError(f"cannot write to store {where}: {cause}; data committed so far is intact, rerun to resume") from exc

    return wrapper  # type: ignore[return-value]


def reads(what: str) -> Callable[[Method], Method]:
    """Turn any failure to read a node (corrupt metadata, damaged chunk) into one line naming it."""

    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (DitfError, OSError):
                raise
            except Exception as exc:
                where = getattr(self, "path", "the store")
                raise DitfError(f"store {where}: {what} is damaged ({reason(exc)}): run `ditf doctor --repair`") from exc

        return wrapper  # type: ignore[return-value]

    return decorate
