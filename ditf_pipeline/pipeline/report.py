"""How command results are rendered (tables, JSON, CSV, Markdown) and per-pair rows written.

The command line prints what the `run_*` functions return through these, so `ditf_cli`
needs nothing below the orchestration layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..core.errors import DitfError
from ..score.report import FORMATS, check_rows_path, render, render_comparison, write_rows

__all__ = [
    "FIGURE_FORMATS", "FILE_FORMATS", "FORMATS", "check_output_format", "check_rows_path", "render", "render_comparison",
    "refuse_format", "render_results", "write_rows",
]

#: the file types of `--figure-format` (analysis.plots.FORMATS) and `ditf export --file-format`
#: (match.export.FORMATS), named here without importing matplotlib or torch: `--format` refuses
#: them with a pointer to the option that takes them (a test pins the copies to the originals)
FIGURE_FORMATS = ("png", "pdf", "svg")
FILE_FORMATS = ("safetensors", "npy")


def check_output_format(fmt: str, allowed: Sequence[str] = FORMATS) -> None:
    """`--format` means one thing on every command: the format of the printed result.

    Checked before any work (a `ditf run` must not extract for an hour and then refuse to print);
    a figure or export file type gets the option that does take it.
    """
    if fmt in allowed:
        return
    choices = ", ".join(allowed)
    if fmt in FIGURE_FORMATS:
        raise DitfError(f"--format is the printed result's format ({choices}); {fmt} is a figure file type: "
                        "give it with --figure-format (ditf show, ditf analyze)")
    if fmt in FILE_FORMATS:
        raise DitfError(f"--format is the printed result's format ({choices}); {fmt} is an export file type: "
                        "give it with ditf export --file-format")
    raise DitfError(f"unknown --format {fmt!r}; choose one of {choices}")


def refuse_format(fmt: str | None, command: str, instead: str) -> None:
    """A command that prints no formatted result keeps `--format` only to say which option it meant."""
    if fmt is not None:
        raise DitfError(f"ditf {command} has no --format (on every command it is the printed result's format: "
                        f"{', '.join(FORMATS)}); give {instead}")


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
