"""Image loading and model-input preprocessing (PIL + numpy only, no torch).

Every image goes through `load_rgb` so that what the DiT sees never depends on how a file
happens to be stored: grayscale, CMYK, palette, alpha and 16-bit files all become plain 8-bit RGB.
The EXIF orientation tag is a choice of the caller (`exif_transpose`): photos (a folder dataset,
the API) are read as a viewer shows them, while the annotated benchmarks are read in their stored
pixel orientation, the frame their keypoints, boxes and sizes are given in (the authors load them
with plain PIL, which ignores the tag). `orientation_label` names the choice in a key's config.

Problems the user can fix (missing, truncated or corrupt files, zero-size or oversized images)
raise `DitfError("cannot read image <path>: <reason>")` on one line.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import DitfError

#: Resampling filter for `preprocess`. DIFT's public eval (`eval_spair.py` ->
#: `SDFeaturizer4Eval.forward`) calls ``img.resize(img_size)`` with PIL's default filter, which
#: is BICUBIC for RGB images since Pillow 7; DiTF's SPair script is a fork of that code. We name
#: the filter explicitly so a Pillow default change cannot silently alter features.
RESAMPLE = Image.Resampling.BICUBIC

#: Background that transparent pixels are composited onto. White, because that is what image
#: viewers (and annotators) show for transparent regions; dropping alpha instead would expose
#: whatever colour the encoder left under transparent pixels (often black or garbage).
ALPHA_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _fail(path: Path | str, reason: str) -> DitfError:
    reason = " ".join(str(reason).split()) or "unknown error"
    return DitfError(f"cannot read image {path}: {reason}")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grayscale -> 8-bit L, scaling instead of clipping.

    PIL's own ``convert("L")`` clips 16-bit values at 255, which turns almost every 16-bit image
    white. We map the full 16-bit range onto 0..255 (divide by 257). Mode "I" (32-bit int) is
    what older Pillow versions give for 16-bit PNGs, so it is treated as 16-bit too. Mode "F" is
    taken as [0, 1] when its maximum is <= 1, else as [0, 255].
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite_max = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 255.0 if finite_max <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(arr * scale), 0, 255)
    else:
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(out).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on `ALPHA_BACKGROUND`)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = _high_bit_depth_to_l(img)
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """`Image.open(path)`, with every way a file can be bad (missing, not decodable, over the
    decompression-bomb limit) turned into one DitfError naming it."""
    if not path.is_file():
        raise _fail(path, "no such file" if not path.exists() else "not a regular file")
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x the limit and raises above 2x; we reject both.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except DitfError:
        raise
    except Image.DecompressionBombError as exc:
        raise _fail(path, f"decompression-bomb limit exceeded ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; all mean "bad file"
        raise _fail(path, f"{type(exc).__name__}: {exc}") from exc


def orientation_label(exif_transpose: bool) -> str:
    """How a key's config records the choice: "exif applied" or "stored" (the tag ignored)."""
    return "exif applied" if exif_transpose else "stored"


def load_rgb(path: Path | str, *, exif_transpose: bool = True) -> Image.Image:
    """Fully decode an image file into an 8-bit RGB image, in its displayed orientation (the
    EXIF tag applied) or, with ``exif_transpose=False``, in its stored pixel orientation.

    The whole file is decoded here (not lazily) so that a truncated or corrupt file fails now,
    with its path, instead of deep inside a batch. The decompression-bomb limit is PIL's
    ``Image.MAX_IMAGE_PIXELS`` (None disables it); anything above it is rejected, not warned.
    """
    path = Path(path)
    with _opened(path) as img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise _fail(path, f"zero-size image ({width}x{height})")
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and width * height > limit:
            raise _fail(
                path,
                f"{width}x{height} = {width * height} pixels exceeds the "
                f"decompression-bomb limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)",
            )
        img.load()
        oriented = ImageOps.exif_transpose(img) if exif_transpose else img
        rgb = to_rgb(oriented)
        if rgb is img:  # keep nothing that refers to the open file
            rgb = rgb.copy()
    if rgb.width <= 0 or rgb.height <= 0:
        raise _fail(path, f"zero-size image ({rgb.width}x{rgb.height})")
    return rgb


_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS_SWAPPING_AXES = {5, 6, 7, 8}  # transpose / rotate 90 / transverse / rotate 270


def image_size(path: Path | str, *, exif_transpose: bool = True) -> tuple[int, int]:
    """(width, height) as `load_rgb` returns it with the same `exif_transpose`, header only.

    Cheap (no pixel decoding), so a whole split can be sized up front; a file that is corrupt
    further in still fails later, in `load_rgb`.
    """
    path = Path(path)
    with _opened(path) as img:
        width, height = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    if width <= 0 or height <= 0:
        raise _fail(path, f"zero-size image ({width}x{height})")
    swapped = exif_transpose and orientation in _ORIENTATIONS_SWAPPING_AXES
    return (height, width) if swapped else (width, height)


def _round_to_multiple(value: float, multiple: int) -> int:
    """Nearest multiple, at least one: ``int(round(value / multiple)) * multiple``.

    Python's `round` (halves to even), as the authors' SPair script computes it: 100x320 at
    640 gives 200 / 16 = 12.5 -> 12 -> 192, not 208.
    """
    return max(multiple, int(round(value / multiple)) * multiple)


def model_size(width: int, height: int, size: int, multiple: int = 16, side: str = "long") -> tuple[int, int]:
    """Model input size (width, height), aspect kept, in the authors' exact arithmetic.

    side="long" (default; DiTF's `eval_spair.py`): scale = size / long side, each side becomes
    ``int(round(side * scale / multiple)) * multiple`` (Python round, halves to even), no padding.
    side="short" (DiTF's `eval_davis.py` `read_frame`): the short side becomes `size` (rounded to
    `multiple`; a no-op for their 960), the long side ``int(((size * long) / short) // coarse) *
    coarse`` with coarse = 2 * `multiple` (32 for Flux): multiply first, then divide, as they do
    (``long * (size / short)`` differs in the last bit: 214x749 at 960 is 3360, not 3328).
    Both results are at least one `multiple`.
    """
    for name, value in (("width", width), ("height", height), ("size", size), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise DitfError(f"model_size: {name} must be a positive integer, got {value!r}")
    width, height, size, multiple = int(width), int(height), int(size), int(multiple)
    if side == "long":
        scale = size / max(width, height)
        return _round_to_multiple(width * scale, multiple), _round_to_multiple(height * scale, multiple)
    if side == "short":
        coarse = 2 * multiple
        long_side = max(coarse, int(((size * max(width, height)) / min(width, height)) // coarse) * coarse)
        short_side = _round_to_multiple(size, multiple)
        return (long_side, short_side) if width >= height else (short_side, long_side)
    raise DitfError(f"resize side must be 'long' or 'short', got {side!r}")


#: How pixels are resampled to the model size (`preprocess`), by name as the store records it:
#: "pil-bicubic" is what the SPair script (and DIFT's) do, ``PIL.Image.resize`` with its RGB
#: default; "cv2-bilinear" is the DAVIS script: ``cv2.resize`` (INTER_LINEAR) of the BGR frame
#: as ``cv2.imread`` returns it, flipped to RGB afterwards.
RESAMPLERS = ("pil-bicubic", "cv2-bilinear")


def load_rgb_cv2(path: Path | str, *, exif_transpose: bool = True) -> Image.Image:
    """Decode a file with ``cv2.imread`` (BGR, 8-bit, as the DAVIS script does) into RGB.

    The BGR -> RGB flip is lossless, so `preprocess(..., resample="cv2-bilinear")` sees
    exactly the BGR array the authors resize. Problems raise the same one-line error as
    `load_rgb`.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file" if not path.exists() else "not a regular file")
    # cv2.imread applies the EXIF orientation itself unless told to ignore it
    flags = cv2.IMREAD_COLOR if exif_transpose else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imread(str(path), flags)
    if bgr is None or bgr.size == 0:
        raise _fail(path, "OpenCV cannot decode it")
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]), mode="RGB")


def pixel_digest(img: Image.Image) -> str:
    """What an image's store row is computed from, as text: sha256 of its size and decoded 8-bit
    RGB pixels (32 hex digits). Equal for the same pixels whatever the file name or format."""
    import hashlib

    rgb = img if img.mode == "RGB" else img.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()[:32]


def load_for_model(path: Path | str, resample: str = "pil-bicubic", *, exif_transpose: bool = True) -> Image.Image:
    """The decoder that goes with a resampler: cv2 for "cv2-bilinear", else `load_rgb`."""
    if resample == "cv2-bilinear":
        return load_rgb_cv2(path, exif_transpose=exif_transpose)
    return load_rgb(path, exif_transpose=exif_transpose)


def resize_pixels(img: Image.Image, new_w: int, new_h: int, resample: str = "pil-bicubic") -> np.ndarray:
    """Resize an RGB image to (new_w, new_h) with a named resampler: (H, W, 3) uint8 RGB."""
    if resample == "pil-bicubic":
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), resample=RESAMPLE)
        return np.asarray(img)
    if resample == "cv2-bilinear":
        import cv2

        bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
        # the authors call cv2.resize even at the same size (a copy then): no shortcut needed
        bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(bgr[:, :, ::-1])
    raise DitfError(f"unknown resampler {resample!r}; choose one of {', '.join(RESAMPLERS)}")


def preprocess(
    img: Image.Image, long_side: int, multiple: int = 16, side: str = "long", resample: str = "pil-bicubic"
) -> np.ndarray:
    """Resize to `model_size` (with `resample`, see `RESAMPLERS`) and scale pixels to [-1, 1].

    Returns float32 of shape (3, H, W), computed as DIFT does: ``(x / 255 - 0.5) * 2`` (the
    DAVIS script's ``(x / 255 - 0.5) / 0.5`` is the same float32 number: halving is exact).
    """
    img = to_rgb(img)
    new_w, new_h = model_size(img.width, img.height, long_side, multiple, side)
    arr = resize_pixels(img, new_w, new_h, resample).astype(np.float32)
    arr = (arr / np.float32(255.0) - np.float32(0.5)) * np.float32(2.0)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
