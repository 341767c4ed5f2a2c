"""One exception type for every problem the user can fix.

The CLI turns a `DitfError` into a single line on stderr and a non-zero exit; anything else is a
bug and keeps its traceback.
"""


class DitfError(Exception):
    """A user-facing error: bad path, corrupt input, unknown name, conflicting store."""
