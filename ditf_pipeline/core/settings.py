"""The settings objects every command, the API and the stages share (torch-free, frozen).

Three questions are kept apart because they have different consequences for the store:

* `FeatureSettings`: *what* is computed. Every field is part of a feature key's identity, so two
  runs with equal `FeatureSettings` may share a key and resume each other.
* `RunSettings`: *how* the same numbers are computed (device, batching, compile, sharding,
  workers). Changing them never changes the key; they are provenance only.
* `LoadSettings`: *where the weights come from* (checkpoint, revision, dtype, text encoders).

`MatchSettings` is the one settings object of the match stage (keypoint pairs, video and
homography alike). All are frozen: a stage that needs an adjusted copy makes one with
`dataclasses.replace`, so nothing a caller passed is ever rewritten behind its back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import DitfError
from .naming import DEFAULT_PCA_DIM, fusion_label, prediction_name

__all__ = ["FeatureSettings", "LoadSettings", "MatchSettings", "RunSettings", "split_fields"]

#: default byte budget of the variant feature cache (float16 40x30x3072 maps are 7.4 MB: ~34
#: images; an SPair category has ~27, and its pairs are consecutive)
FEATURE_CACHE_BYTES = 256 * 2**20


def _ints(values: Sequence[int] | int | None) -> tuple[int, ...] | None:
    """Repeatable options arrive as lists (or one int from Python): stored as a tuple, hashable."""
    if values is None:
        return None
    if isinstance(values, int):
        return (values,)
    return tuple(int(v) for v in values) or None


@dataclass(frozen=True)
class FeatureSettings:
    """What is computed: unset fields come from the benchmark's and the model's defaults.

    `k` and `t` are tuples (several keys are extracted in one pass over the images).
    """

    model: str = "flux"
    k: tuple[int, ...] | None = None
    t: tuple[int, ...] | None = None
    img_size: int | None = None
    resize: str | None = None  # side set to img_size: long | short (default: the benchmark's)
    resample: str | None = None  # pil-bicubic | cv2-bilinear (default: the benchmark's)
    ensemble_size: int | None = None
    seed: int = 0
    prompt: str | None = None
    precision: str = "default"  # default | paper

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _ints(self.k))
        object.__setattr__(self, "t", _ints(self.t))


@dataclass(frozen=True)
class RunSettings:
    """How the run goes: changes speed and placement, never the stored numbers."""

    device: str = "auto"
    batch_size: int | None = None  # split the ensemble into batches of this size
    batch_images: int | None = None  # images of one token grid per forward
    compile: str = "auto"  # auto | on | off
    offload: bool = False
    shard: str | None = None  # "i/N": this job's share of the images or pair blocks
    workers: int | None = None  # local dask workers
    scheduler: str | None = None  # an existing dask cluster
    jobs: int | None = None  # match on the CPU: worker processes (None: every core)


@dataclass(frozen=True)
class LoadSettings:
    """Where the model's weights come from and in which dtype they run."""

    weights: str | None = None  # local diffusers folder or hub id overriding the model's
    revision: str | None = None
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    text_device: str | None = None  # where the text encoders run (default: the DiT's device)


@dataclass(frozen=True)
class MatchSettings:
    """What the match stage needs beyond the feature key (pair protocol options included)."""

    variant: str = "adaln+cd"
    protocol: str = "dift"
    channels: str = "auto"  # "auto", "none" or comma-separated channel indices
    soft_window: int | None = None  # geoaware only
    channel_sample: int = 32  # images used to detect massive channels for "auto"
    fuse: str | None = None  # pairs only: partner model concatenated per pair (e.g. "dinov2-b14")
    pca_dim: int = DEFAULT_PCA_DIM  # PCA of the DiT part over each pair before fusing (0: none)
    jobs: int | None = None  # pairs: this thread + jobs-1 processes (None: every core); CPU only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_bytes: int = FEATURE_CACHE_BYTES  # budget of the variant feature cache
    shard: str | None = None  # pairs: "i/N", only blocks b with b mod N == i (job arrays)

    @property
    def label(self) -> str:
        """The variant as results name it: with `fuse`, ``<variant>+<model>-pca<dim>``."""
        return fusion_label(self.variant, self.fuse, self.pca_dim)

    @property
    def name(self) -> str:
        """Store key of pair predictions: variant/protocol (soft-argmax window appended)."""
        return prediction_name(self.variant, self.protocol, self.soft_window, self.fuse, self.pca_dim)

    def prediction_name(self, task: str) -> str:
        """Store key of this stage's predictions on a benchmark of `task` (pairs, video, homography)."""
        if task == "pairs":
            return self.name
        if self.fuse:
            raise DitfError(f"--fuse applies to keypoint-pair benchmarks only, not {task}")
        return f"{self.variant}/{task}"


_GROUPS = (FeatureSettings, RunSettings, LoadSettings)


def split_fields(values: Mapping[str, Any], features: FeatureSettings | None = None, run: RunSettings | None = None,
                 load: LoadSettings | None = None) -> tuple[FeatureSettings, RunSettings, LoadSettings]:
    """Keyword fields (``k=[1], device="cpu"``) sorted into the three settings objects.

    Given objects are the base: a field named in `values` replaces theirs in a copy. A name no
    object has is refused, so a misspelt keyword is an error and not a silent default.
    """
    bases = [features or FeatureSettings(), run or RunSettings(), load or LoadSettings()]
    names = [{f.name for f in fields(group)} for group in _GROUPS]
    unknown = sorted(set(values) - set().union(*names))
    if unknown:
        known = ", ".join(sorted(set().union(*names)))
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; known: {known}")
    out = [replace(base, **{k: v for k, v in values.items() if k in group})
           for base, group in zip(bases, names)]
    return out[0], out[1], out[2]
