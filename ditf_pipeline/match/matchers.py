"""The matchers of the pair benchmarks by protocol name (`make_matcher`), and the names of the
match room's building blocks in one place.

Where each piece lives: the ``dift`` protocol in `dift`, ``geoaware`` in `geoaware`, the
byte-bounded LRU in `cache`, per-thread buffers and the intra-op thread rule in `threads`, input
checks in `grids`, device and nearest-neighbour (torch / FAISS) choice in `device`, bilinear taps
in `taps`. Code of this package imports from those modules; the re-exports below keep
``from ditf_pipeline.match.matchers import ...`` working for tests, benchmarks and notebooks.
"""

from __future__ import annotations

from ..core.naming import PROTOCOL_RULES
from .cache import ByteLRU, nbytes  # noqa: F401  (re-exported)
from .device import (  # noqa: F401  (re-exported)
    CPU_NN_BACKEND,
    FAISS_GPU_MIN_SCORES,
    faiss_gpu_search,
    faiss_gpus,
    mutual_nearest_neighbours,
    nearest_neighbours,
    resolve_match_device,
)
from .dift import (  # noqa: F401  (re-exported)
    CPU_SCORE_BYTES,
    DIFT_CACHE_BYTES,
    UPSAMPLE_MODES,
    DiftMatcher,
    dift_reference_similarity,
    match_dift_reference,
    resolve_upsample,
    split_pixels,
)
from .geoaware import (  # noqa: F401  (re-exported)
    GEOAWARE_CACHE_BYTES,
    GeoAwareFrame,
    GeoAwareMatcher,
    frame_cell_features,
    geoaware_frame,
    geoaware_threshold_scale,
    window_soft_argmax,
)
from .grids import ImageSize  # noqa: F401  (re-exported)
from .grids import integer_keypoints as _integer_keypoints  # noqa: F401  (its former private name)
from .taps import LinearTaps, linear_taps, upsampled_norms, upsampled_vectors  # noqa: F401  (re-exported)
from .threads import one_intra_op_thread  # noqa: F401  (re-exported)

Matcher = DiftMatcher | GeoAwareMatcher


def make_matcher(protocol: str, **options) -> Matcher:
    """The matcher of a protocol by name (``dift`` or ``geoaware``)."""
    if protocol == "dift":
        return DiftMatcher(**options)
    if protocol == "geoaware":
        return GeoAwareMatcher(**options)
    from ..validate import unknown

    raise unknown("matching protocol", protocol, list(PROTOCOL_RULES), "protocols")
