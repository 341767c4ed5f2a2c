"""What `ditf view` computes, as plain functions of cached arrays (no web framework here).

A click must answer in well under 200 ms at SPair size (40 x 40 x 3072 features, ~500 px
images), so nothing is ever upsampled to image size per channel:

* the source vector is the bilinear interpolation of the source map at the clicked pixel,
  with the matcher's own taps (`match.upsampled_vectors`), so it is exactly the vector
  `ditf match` uses for a keypoint at that pixel;
* the heatmap is the cosine of that vector with every target CELL (feature resolution,
  h x w values); the browser stretches it over the image, which is where the cells lie
  (align_corners=False: cell j covers [j W / w, (j + 1) W / w));
* the predicted point is the matcher's exact full-resolution argmax (`predict.pair_matcher`,
  the matcher `ditf match` builds: one interpolation of an (h, w) dot-product map, target
  norms cached once per open pair), on the maps of `predict.pair_feature_cache` (float16, as
  `ditf match` caches them; held here in float32, which is exact), so it equals the stored
  prediction of `ditf match` for a keypoint. Maps and matches are computed with ONE torch
  intra-op thread, as `ditf match` on the CPU computes them (`one_intra_op_thread`): a matmul split
  over several threads sums in another order, and a near tie of the argmax can flip.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DitfError
# the matching rules a view can apply (stored geoaware-softN predictions are listed, not recomputed)
from ..core.naming import PROTOCOLS
from ..match.taps import upsampled_vectors
from ..match.threads import one_intra_op_thread

#: the variants a view computes from the cache for every AdaLN key (the paper's ablation)
BASE_VARIANTS = ("raw", "adaln", "adaln+cd")


@dataclass
class FusedSpec:
    """How a stored fused prediction was made (read from its config), so the view can redo it."""

    label: str  # e.g. "adaln+cd+tiny-dinov2-pca1280"
    variant: str  # the DiT part's variant
    model: str  # partner key
    k: int
    t: int
    pca_dim: int
    channels: list[int]


def fused_specs(prediction_configs: Mapping[str, Mapping]) -> dict[str, FusedSpec]:
    """Fused labels of a key's stored predictions ("variant/protocol" -> config) -> their recipe."""
    found: dict[str, FusedSpec] = {}
    for name, config in prediction_configs.items():
        fuse = config.get("fuse")
        if not isinstance(fuse, Mapping) or "model" not in fuse:
            continue
        label = str(config.get("variant", name.split("/")[0]))
        suffix = f"+{str(fuse['model']).replace('/', '-')}-"
        base = label.split(suffix)[0] if suffix in label else label
        try:
            found[label] = FusedSpec(label, base, str(fuse["model"]), int(fuse["k"]), int(fuse["t"]),
                                     int(fuse.get("pca_dim") or 0), [int(c) for c in config.get("channels") or []])
        except (TypeError, ValueError):
            continue  # a config this ditf cannot read is skipped, not fatal
    return found


def prediction_scope_name(label: str) -> tuple[str | None, str]:
    """A `FeatureStore.prediction_groups` label -> (scope or None for schema 1, "variant/protocol")."""
    parts = label.split("/")
    if len(parts) >= 3:
        return parts[0], "/".join(parts[1:])
    return None, label


def choose_predictions(groups: Sequence[tuple[str, object]], scope: str | None, split: str | None) -> dict[str, object]:
    """The stored predictions a view shows, by "variant/protocol", among a key's groups of every scope.

    A name is taken from `scope` (the view's split and pair list, `store.prediction_scope`) when
    stored there, else from the unscoped place of schema 1, else from the only scope of `split`
    (any split when None) holding it: e.g. predictions of a superset of the pairs. A name held by
    several other pair lists is left out (ambiguous), as `FeatureStore.open_predictions` refuses it.
    """
    by_name: dict[str, dict[str | None, object]] = {}
    for label, arrays in groups:
        group_scope, name = prediction_scope_name(label)
        by_name.setdefault(name, {})[group_scope] = arrays
    chosen: dict[str, object] = {}
    for name, scopes in by_name.items():
        if scope is not None and scope in scopes:
            chosen[name] = scopes[scope]
        elif None in scopes:
            chosen[name] = scopes[None]
        else:
            candidates = [s for s in scopes if split is None or s.rsplit("-", 1)[0] == split]
            if len(candidates) == 1:
                chosen[name] = scopes[candidates[0]]
    return chosen


def default_key(labels: Sequence[str], keys: Sequence[tuple[str, int, int]],
                defaults: Mapping[str, tuple[int, int]]) -> tuple[str | None, str | None]:
    """(label, note) of the key to open among `labels` ((model, k, t) each), by the rule of every
    ditf command: a model's default key when stored, else the only key, else the first with a note."""
    if not labels:
        return None, None
    for label, (model, k, t) in zip(labels, keys):
        if defaults.get(model) == (k, t):
            return label, None
    if len(labels) == 1:
        return labels[0], None
    return labels[0], (f"the store holds {len(labels)} keys and none is a model's default key: "
                       f"showing {labels[0]}; choose another above")


def check_point(x: float, y: float, size: tuple[int, int]) -> tuple[int, int]:
    """The clicked pixel as integers inside the image (the matcher rounds keypoints the same way)."""
    width, height = size
    if not (np.isfinite(x) and np.isfinite(y)):
        raise DitfError(f"point ({x}, {y}) is not a finite pixel position")
    xi, yi = int(np.rint(x)), int(np.rint(y))
    if not (0 <= xi <= width - 1 and 0 <= yi <= height - 1):
        raise DitfError(f"point (x={x:g}, y={y:g}) lies outside the source image of {width}x{height} pixels")
    return xi, yi


@dataclass
class VariantMaps:
    """One variant's feature maps of an open pair, with the per-target work done once.

    `trg_inverse_norms` are 1 / |g_j| of the target cells (for the low-resolution heatmap);
    the matchers keep their own full-resolution target caches (warmed on first use). `paper`:
    the maps of a ``--precision paper`` key under ``dift`` (`paper.paper_matching`), matched
    with the authors' fp16 arithmetic as `ditf match` does.
    """

    variant: str
    src: torch.Tensor  # (h, w, D) float32
    trg: torch.Tensor  # (h', w', D) float32
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    paper: bool = False
    trg_flat: torch.Tensor = field(init=False)
    trg_inverse_norms: torch.Tensor = field(init=False)
    matchers: dict = field(default_factory=dict, init=False)
    _keypoints: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.src = torch.as_tensor(self.src).to(torch.float32).contiguous()
        self.trg = torch.as_tensor(self.trg).to(torch.float32).contiguous()
        if self.src.ndim != 3 or self.trg.ndim != 3 or self.src.shape[-1] != self.trg.shape[-1]:
            raise DitfError(f"variant {self.variant}: feature maps {tuple(self.src.shape)} and {tuple(self.trg.shape)} do not match")
        self.trg_flat = self.trg.reshape(-1, self.trg.shape[-1])
        self.trg_inverse_norms = 1.0 / torch.linalg.vector_norm(self.trg_flat, dim=1).clamp_min(1e-12)

    def matcher(self, protocol: str):
        if protocol not in PROTOCOLS:
            raise DitfError(f"unknown protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
        if protocol not in self.matchers:
            from ..match.predict import MatchSettings, pair_matcher

            self.matchers[protocol] = pair_matcher(MatchSettings(protocol=protocol), paper=self.paper and protocol == "dift")
        return self.matchers[protocol]

    def match(self, points: np.ndarray, protocol: str) -> np.ndarray:
        """(N, 2) predicted (x, y) for (N, 2) source points: the very call `ditf match` makes."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        matcher = self.matcher(protocol)
        with one_intra_op_thread():
            return matcher.match(self.src, self.src_size, self.trg, self.trg_size, points, trg_key="target")

    def match_keypoints(self, keypoints: np.ndarray, protocol: str) -> np.ndarray:
        """All of a pair's keypoints in one batched call, as `ditf match` makes it (cached per protocol)."""
        if protocol not in self._keypoints:
            self._keypoints[protocol] = self.match(keypoints, protocol)
        return self._keypoints[protocol]

    @torch.inference_mode()
    def heatmap(self, x: int, y: int) -> np.ndarray:
        """(h', w') cosine of the source vector at pixel (x, y) with every target cell."""
        vector = upsampled_vectors(self.src, self.src_size, np.array([x]), np.array([y]))[0]
        cosine = (self.trg_flat @ vector) * self.trg_inverse_norms / torch.linalg.vector_norm(vector).clamp_min(1e-12)
        return cosine.reshape(self.trg.shape[0], self.trg.shape[1]).numpy()


def click(maps: VariantMaps, x: int, y: int, protocol: str = "dift", pred: np.ndarray | None = None) -> dict:
    """Heatmap (feature resolution, rounded for JSON) and predicted point of one variant.

    `pred`, when given, is the point's prediction from a batched match (a keypoint of the pair).
    """
    heat = maps.heatmap(x, y)
    if pred is None:
        pred = maps.match(np.array([[x, y]]), protocol)[0]
    return {
        "variant": maps.variant,
        "heatmap": {
            "rows": int(heat.shape[0]), "cols": int(heat.shape[1]),
            "min": float(heat.min()), "max": float(heat.max()),
            "values": np.round(heat, 4).ravel().tolist(),
        },
        "pred": [float(pred[0]), float(pred[1])],
    }


def keypoint_marks(pred: np.ndarray, trg_kps: np.ndarray, threshold_base: float, alpha: float, protocol: str) -> list[bool]:
    """Correct / wrong per keypoint under the protocol's rule (`analyze.keypoint_correct`)."""
    from types import SimpleNamespace

    from ..analysis.analyze import keypoint_correct

    pair = SimpleNamespace(pair_id="view", trg_kps=trg_kps, threshold_base=threshold_base)
    return [bool(v) for v in keypoint_correct(pred, pair, alpha, protocol)]


def pair_pcks(predictions: Mapping[str, np.ndarray], pairs: Sequence, alpha: float, protocol: str) -> dict[str, float | None]:
    """pair id -> fraction of its keypoints correct at `alpha` (None: no stored prediction)."""
    out: dict[str, float | None] = {}
    for pair in pairs:
        pred = predictions.get(pair.pair_id)
        if pred is None or len(pred) != len(pair.trg_kps) or len(pred) == 0:
            out[pair.pair_id] = None
            continue
        marks = keypoint_marks(pred, pair.trg_kps, pair.threshold_base, alpha, protocol)
        out[pair.pair_id] = float(np.mean(marks))
    return out


def _png_bytes(draw) -> bytes:
    """Run a `plots` function that writes a PNG to a path, and return the file's bytes."""
    with tempfile.TemporaryDirectory(prefix="ditf-view-") as folder:
        path = Path(folder) / "figure.png"
        draw(path)
        return path.read_bytes()


def magnitude_png(arrays, sample: int = 8, title: str = "") -> bytes:
    """`ditf analyze`'s magnitude-per-channel figure of a key (massive channels in red)."""
    from ..analysis import analyze as an
    from ..analysis import plots as pl

    result = an.analyze_key(arrays, sample=sample)
    massive = result.summary["massive_channels"]
    label = title or f"{arrays.path} ({result.summary['n_images']} image(s)); massive channels: {massive or 'none'}"
    return _png_bytes(lambda path: pl.plot_magnitudes(path, result.example, result.channel_mean, massive, label))


def pca_png(arrays, rows: Sequence[int], images: Sequence[np.ndarray], names: Sequence[str], channels: Sequence[int],
            title: str = "") -> bytes:
    """`ditf analyze`'s PCA colour maps (raw, adaln, adaln+cd) of a few images, fitted jointly."""
    from ..analysis import analyze as an
    from ..analysis import plots as pl

    features = [an.stage_features(arrays, int(row), channels) for row in rows]
    maps = {stage: an.pca_rgb([f[stage] for f in features]) for stage in features[0]}
    return _png_bytes(lambda path: pl.plot_pca(path, list(images), maps, list(names), title))
