"""The package version and the store schema version, importable without the package's root.

They live in the foundation so the store and the stages can stamp what they write without
importing `ditf_pipeline` itself (its public names reach into the API layer).
"""

from __future__ import annotations

__version__ = "0.1.0"
#: the layout `store/schema.py` writes; stores of an older version are upgraded on open
SCHEMA_VERSION = 3
