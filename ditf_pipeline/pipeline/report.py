"""How command results are rendered (tables, JSON, CSV, Markdown) and per-pair rows written.

The command line prints what the `run_*` functions return through these, so `ditf_cli`
needs nothing below the orchestration layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..score.report import check_rows_path, render, render_comparison, write_rows

__all__ = ["check_rows_path", "render", "render_comparison", "render_results", "write_rows"]


def render_results(results: Sequence[dict], fmt: str) -> str:
    """score/run results: JSON is always a list of result objects, one for one result, so a script
    reads the same shape whatever the number of variants or keys (docs/outputs.md); the other
    formats put the results one after another (CSV under one header)."""
    if fmt == "json":
        return json.dumps(list(results), indent=2) + "\n"
    texts = [render(r, fmt) for r in results]
    headers = {text.split("\n", 1)[0] for text in texts}
    if fmt == "csv" and len(headers) == 1:  # one frame: the context columns tell the variants apart
        return texts[0] + "".join(text.split("\n", 1)[1] for text in texts[1:])
    return "\n".join(texts)
