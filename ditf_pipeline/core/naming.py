"""How stored predictions are named, and the names they are built from (torch-free, so the scorer
can find them without torch): protocols, the PCA default, the DAVIS run marker."""

from __future__ import annotations

#: the paper's DiT part after PCA ("+PCA of the DiT part to 1280 dims over the pair")
DEFAULT_PCA_DIM = 1280

#: the pair protocols and how each compares a prediction's error with the PCK threshold
#: (DIFT counts an error equal to the threshold as correct, GeoAware-SC does not)
PROTOCOL_RULES = {"dift": "<=", "geoaware": "<"}
PROTOCOLS = tuple(PROTOCOL_RULES)

#: name of the marker a DAVIS propagation run writes into its output folder: a folder without it
#: was not written by ditf and is never overwritten
RUN_MARKER = "ditf_propagation.json"


def fusion_label(variant: str, fuse: str | None, pca_dim: int = DEFAULT_PCA_DIM) -> str:
    """How results name a fused variant: ``<variant>+<model>-pca<dim>`` (``-nopca`` for 0)."""
    if not fuse:
        return variant
    return f"{variant}+{fuse.replace('/', '-')}-" + (f"pca{pca_dim}" if pca_dim else "nopca")


def prediction_name(variant: str, protocol: str, soft_window: int | None = None, fuse: str | None = None,
                    pca_dim: int = DEFAULT_PCA_DIM) -> str:
    """Store key of pair predictions: ``<label>/<protocol>`` (soft-argmax window appended)."""
    protocol_key = protocol if not soft_window else f"{protocol}-soft{soft_window}"
    return f"{fusion_label(variant, fuse, pca_dim)}/{protocol_key}"
