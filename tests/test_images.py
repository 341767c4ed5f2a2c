"""load_rgb / model_size / preprocess: every odd file becomes RGB of the right size or a DitfError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.core.images import image_size, load_rgb, model_size, preprocess


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_rgb_jpeg_roundtrip(tmp_path):
    path = _save(Image.new("RGB", (40, 30), (10, 200, 30)), tmp_path / "a.jpg", quality=95)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.abs(np.asarray(img).astype(int) - [10, 200, 30]).max() < 8


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA"])
def test_modes_become_rgb(tmp_path, mode):
    src = Image.new("RGB", (33, 21), (255, 255, 255)).convert(mode)
    ext = {"CMYK": "jpg", "LA": "png"}.get(mode, "png")
    img = load_rgb(_save(src, tmp_path / f"x.{ext}"))
    assert img.mode == "RGB" and img.size == (33, 21)
    assert np.asarray(img).min() > 240  # white stays white


def test_cmyk_colour_is_converted(tmp_path):
    src = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    img = load_rgb(_save(src, tmp_path / "c.tif"))
    assert img.getpixel((5, 5)) == (255, 0, 0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((10, 12), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (12, 10)
    assert img.getpixel((3, 3)) == (128, 128, 128)


def test_alpha_composited_on_white(tmp_path):
    src = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    src.putpixel((1, 1), (255, 0, 0, 255))
    src.putpixel((2, 2), (0, 0, 255, 128))
    img = load_rgb(_save(src, tmp_path / "a.png"))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (255, 0, 0)
    r, g, b = img.getpixel((2, 2))
    assert 120 <= r <= 135 and r == g and b == 255


def test_palette_with_transparency(tmp_path):
    src = Image.new("P", (5, 5), 0)
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    src.putpixel((2, 2), 1)
    img = load_rgb(_save(src, tmp_path / "p.png", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((2, 2)) == (255, 0, 0)


def test_exif_orientation_applied(tmp_path):
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = _save(src, tmp_path / "r.jpg", exif=exif, quality=95)
    img = load_rgb(path)
    assert img.size == (20, 40) == image_size(path)
    r, g, b = img.getpixel((10, 3))  # left strip is now at the top
    assert r > 200 and b < 60


def test_truncated_jpeg(tmp_path):
    path = _save(Image.effect_noise((64, 64), 50).convert("RGB"), tmp_path / "t.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DitfError, match=r"cannot read image .*t\.jpg: .*truncated"):
        load_rgb(path)


def test_garbage_and_empty_and_missing(tmp_path):
    (tmp_path / "g.jpg").write_bytes(b"this is not an image at all")
    (tmp_path / "e.png").write_bytes(b"")
    for name in ("g.jpg", "e.png", "missing.jpg"):
        with pytest.raises(DitfError, match=f"cannot read image .*{name}"):
            load_rgb(tmp_path / name)
    with pytest.raises(DitfError, match="not a regular file"):
        load_rgb(tmp_path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_zero_size_png(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")
    path = tmp_path / "zero.png"
    path.write_bytes(data)
    with pytest.raises(DitfError, match=r"cannot read image .*zero\.png"):
        load_rgb(path)


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (30, 30)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # between 1x and 2x: PIL only warns
    with pytest.raises(DitfError, match="decompression-bomb"):
        load_rgb(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # above 2x: PIL raises itself
    with pytest.raises(DitfError, match="decompression-bomb"):
        load_rgb(path)


def test_load_rgb_does_not_keep_file_open(tmp_path):
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "x.png")
    img = load_rgb(path)
    path.unlink()
    assert np.asarray(img).shape == (4, 4, 3)


@pytest.mark.parametrize(
    ("w", "h", "long_side", "expected"),
    [
        (500, 375, 640, (640, 480)),
        (375, 500, 640, (480, 640)),
        (500, 333, 640, (640, 432)),  # 426.2 -> 432 (nearest multiple of 16)
        (500, 330, 640, (640, 416)),  # 422.4 -> 416
        (100, 100, 640, (640, 640)),  # small images are upsampled
        (1000, 10, 640, (640, 16)),  # at least one multiple
        (640, 200, 650, (656, 208)),  # long side rounded too: 650 -> 656
        (300, 200, 512, (512, 336)),  # 341.3 -> 336
    ],
)
def test_model_size(w, h, long_side, expected):
    assert model_size(w, h, long_side) == expected


def test_model_size_rounds_half_to_even_as_the_authors_do():
    assert model_size(400, 100, 400, multiple=8) == (400, 96)  # 100 / 8 = 12.5 -> 12 (Python round)
    assert model_size(100, 320, 640) == (192, 640)  # the example: 12.5 -> 12, not 13


def _authors_long_rule(w: int, h: int, size: int) -> tuple[int, int]:
    """eval_spair.py, restated: scale = size / max(h, w); side -> int(round(side * scale / 16)) * 16."""
    scale = size / max(h, w)
    return max(16, int(round(w * scale / 16)) * 16), max(16, int(round(h * scale / 16)) * 16)


def _authors_short_rule(w: int, h: int, size: int) -> tuple[int, int]:
    """eval_davis.py `read_frame`, restated (the short side is `size` itself: a multiple of 16 here)."""
    if h > w:
        return size, max(32, int(((size * h) / w) // 32 * 32))
    return max(32, int(((size * w) / h) // 32 * 32)), size


@pytest.mark.parametrize("size", [500, 640, 768])
def test_long_side_rule_equals_the_authors_over_thousands_of_sizes(size):
    sides = range(100, 1001, 3)  # 301 x 301 = 90,601 sizes per target, every aspect ratio SPair has
    mismatches = [(w, h) for w in sides for h in sides if model_size(w, h, size) != _authors_long_rule(w, h, size)]
    assert mismatches == []


@pytest.mark.parametrize("size", [480, 960])
def test_short_side_rule_equals_the_authors_over_thousands_of_sizes(size):
    sides = range(100, 2001, 7)
    mismatches = [(w, h) for w in sides for h in sides
                  if model_size(w, h, size, 16, "short") != _authors_short_rule(w, h, size)]
    assert mismatches == []


def test_short_side_rule_multiplies_before_dividing():
    # long * (960 / short) = 3359.99... floors to 3328; (960 * long) / short = 3360.0 exactly
    assert model_size(214, 749, 960, 16, "short") == (960, 3360)
    assert model_size(749, 214, 960, 16, "short") == (3360, 960)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, None])
def test_model_size_rejects_bad_values(bad):
    with pytest.raises(DitfError, match="model_size"):
        model_size(100, 100, bad)


def test_preprocess_shape_range_and_values():
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    arr = preprocess(img, long_side=64)
    assert arr.dtype == np.float32 and arr.shape == (3, 32, 64)  # 38.4 -> 32
    assert arr.flags.c_contiguous
    np.testing.assert_allclose(arr[:, 5, 5], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-6)


def test_preprocess_no_resize_when_size_matches():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    arr = preprocess(Image.fromarray(pixels), long_side=32)
    np.testing.assert_array_equal(np.rint((arr + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0), pixels)
    assert arr.min() >= -1.0 and arr.max() <= 1.0


def test_preprocess_is_bicubic():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    arr = preprocess(img, long_side=64)
    ref = np.asarray(img.resize((64, 48), Image.Resampling.BICUBIC), dtype=np.float32)
    np.testing.assert_allclose(arr.transpose(1, 2, 0), (ref / 255 - 0.5) * 2, atol=1e-6)


def test_preprocess_cv2_bilinear_is_the_davis_scripts_resize():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    arr = preprocess(Image.fromarray(rgb), 64, 16, side="short", resample="cv2-bilinear")
    # read_frame: cv2.resize of the BGR frame (INTER_LINEAR default), float, /255, flip to RGB, (x-0.5)/0.5
    # 41 x 30 at 960 -> short side 64, long side (64 * 41) / 30 = 87.5 floored to /32 -> 64
    bgr = cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), (64, 64))
    ref = (bgr.astype(np.float32) / 255.0)[:, :, ::-1]
    ref = (ref - 0.5) / 0.5
    assert arr.shape == (3, 64, 64)
    np.testing.assert_array_equal(arr.transpose(1, 2, 0), ref)
    bicubic = preprocess(Image.fromarray(rgb), 64, 16, side="short")
    assert not np.array_equal(arr, bicubic)  # the resampler matters
    with pytest.raises(DitfError, match="unknown resampler"):
        preprocess(Image.fromarray(rgb), 64, resample="lanczos")


def test_cv2_decoder_reads_what_the_davis_script_reads(tmp_path):
    cv2 = pytest.importorskip("cv2")
    from ditf_pipeline.core.images import load_for_model

    rng = np.random.default_rng(3)
    path = tmp_path / "f.jpg"
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(path, quality=90)
    img = load_for_model(path, "cv2-bilinear")
    np.testing.assert_array_equal(np.asarray(img)[:, :, ::-1], cv2.imread(str(path)))
    with pytest.raises(DitfError, match="cannot read image"):
        load_for_model(tmp_path / "missing.jpg", "cv2-bilinear")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DitfError, match="cannot read image"):
        load_for_model(tmp_path / "bad.jpg", "cv2-bilinear")


def test_preprocess_accepts_non_rgb():
    arr = preprocess(Image.new("L", (20, 10), 255), long_side=32)
    assert arr.shape == (3, 16, 32) and np.allclose(arr, 1.0)


def test_image_size_header_only(tmp_path):
    path = _save(Image.new("L", (31, 17)), tmp_path / "s.png")
    assert image_size(path) == (31, 17)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DitfError, match=r"cannot read image .*bad\.jpg"):
        image_size(tmp_path / "bad.jpg")
    with pytest.raises(DitfError, match="no such file"):
        image_size(tmp_path / "missing.png")


def test_short_side_rule_of_the_davis_script():
    # DiTF's DAVIS script: short side -> 960, long side floored to a multiple of 32
    assert model_size(854, 480, 960, 16, side="short") == (1696, 960)
    assert model_size(480, 854, 960, 16, side="short") == (960, 1696)
    assert model_size(100, 100, 64, 16, side="short") == (64, 64)
    with pytest.raises(DitfError, match="resize side"):
        model_size(100, 100, 64, 16, side="middle")
