"""How stored predictions are named, and the names they are built from (torch-free, so the scorer
can find them without torch): protocols, the PCA default, the DAVIS run marker."""

from __future__ import annotations

#: the paper's DiT part after PCA ("+PCA of the DiT part to 1280 dims over the pair")
DEFAULT_PCA_DIM = 1280

#: (k, t) each registered model extracts by default, readable without torch: reading commands
#: (`ditf score`) pick this key among several without importing the registry. A model missing
#: here is looked up in the registry; tests pin every entry to its `ModelSpec`.
MODEL_DEFAULT_KEYS: dict[str, tuple[int, int]] = {
    "chroma": (28, 260), "dinov2-b14": (11, 0), "dinov2-g14": (39, 0), "dinov2-l14": (23, 0),
    "dinov2-s14": (11, 0), "flux": (28, 260), "flux-schnell": (28, 260), "flux2-dev": (28, 260),
    "lumina2": (13, 260), "pixart-alpha": (14, 141), "pixart-sigma": (14, 141), "qwen-image": (30, 260),
    "sana": (10, 260), "sd2.1": (1, 261), "sd3": (9, 340), "sd3.5": (23, 380), "sd3.5-medium": (12, 260),
    "tiny-chroma": (2, 260), "tiny-dinov2": (3, 0), "tiny-flux": (2, 260), "tiny-flux2": (2, 260),
    "tiny-lumina2": (2, 260), "tiny-pixart": (2, 141), "tiny-pixart-sigma": (2, 141),
    "tiny-qwen-image": (2, 260), "tiny-sana": (2, 260), "tiny-sd": (1, 261), "tiny-sd3": (2, 340),
    "tiny-sd3.5-medium": (2, 260), "tiny-z-image": (2, 260), "z-image-turbo": (15, 260),
}

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
