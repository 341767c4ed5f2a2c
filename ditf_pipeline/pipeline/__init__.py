"""The orchestration layer: one function per `ditf` command, shared by the command line and the API.

`ditf extract` and `DiTF.features` both call `run_extract` (or, without a store,
`extract_in_memory`: the same settings and extractor), so they give the same numbers by
construction: the same defaults, the same per-image seeding, the same store layout. Each
command of `ditf_cli` parses its options, calls one function here and prints what it returns.
Heavy modules (torch, diffusers, zarr) are imported inside the functions, so importing this
package stays cheap (`ditf score` never loads torch).

* `commands`: extract, match, score, ablate, run (settings objects from `core.settings`);
* `stages`: the match and score drivers of every kind of benchmark (pairs, video, homography);
* `views`: analyze and show; `view`: the `ditf view` web app; `compare`, `export`, `pack`, `probe`,
  `doctor` (`check`), `demo`.
"""

from __future__ import annotations

from .commands import (
    DEFAULT_STORE, MatchRun, ScoreRun, check_key, check_pair_arguments, extract_in_memory, list_models, reading_store, run_ablate, run_all,
    run_extract, run_match, run_score, single_key, stored_variants, writing_store,
)
from .compare import run_compare
from .demo import run_demo
from .doctor import check
from .export import run_export
from .pack import run_pack
from .probe import run_probe
from .view import run_view
from .views import run_analyze, run_show

__all__ = [
    "DEFAULT_STORE", "MatchRun", "ScoreRun", "check", "check_key", "check_pair_arguments", "extract_in_memory", "list_models",
    "run_ablate", "run_all",
    "run_analyze", "run_compare", "run_demo", "run_export", "run_extract", "run_match", "run_pack", "run_probe",
    "run_score", "run_show", "run_view", "reading_store", "single_key", "stored_variants", "writing_store",
]
