"""The Python API's input conventions, each a trap a new user fell into (issue: interfaces that tell the truth).

Identity is content (same-stem files never share a row), pixel ranges are declared (DIFT's
[-1, 1] tensors convert as declared; nothing is clipped), `prompt=""` is the empty prompt,
per-image prompts share one store, the text encoders load once per model object, the
in-memory path (no `store=`) equals the stored one, and `from_pretrained` takes what diffusers' does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditf_pipeline import DiTF, open_store
from ditf_pipeline.api import image_key, resolve_model
from ditf_pipeline.core.errors import DitfError

SETTINGS = {"img_size": 32, "ensemble_size": 1}


def _pixels(seed: int, size=(48, 32)) -> np.ndarray:
    """A smooth random RGB image (H, W, 3) uint8."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize(size, Image.BILINEAR))


@pytest.fixture(scope="module")
def model() -> DiTF:
    return DiTF.from_pretrained("tiny-flux")


def test_same_stem_images_in_one_store_get_their_own_features(model, tmp_path):
    paths = []
    for seed, folder in enumerate(("d1", "d2")):
        (tmp_path / folder).mkdir()
        Image.fromarray(_pixels(seed)).save(tmp_path / folder / "00000.png")
        paths.append(tmp_path / folder / "00000.png")
    store = tmp_path / "s.zarr"
    first = model.features(paths[0], store=store, **SETTINGS)[0]
    second = model.features(paths[1], store=store, **SETTINGS)[0]
    assert not torch.equal(first, second)
    assert torch.equal(second, model.features(paths[1], store=tmp_path / "alone.zarr", **SETTINGS)[0])
    assert sorted(open_store(store).images("folder")) == sorted(image_key(p) for p in paths)


def test_a_minus_one_one_tensor_is_converted_as_declared_never_clipped(model):
    pixels = _pixels(0)
    reference = model.features(Image.fromarray(pixels), **SETTINGS)[0]
    dift = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0  # DIFT's input convention
    with pytest.raises(DitfError, match=r"outside value_range \(0, 1\).*value_range=\(-1, 1\)"):
        model.features(dift, **SETTINGS)
    assert torch.equal(model.features(dift, value_range=(-1, 1), **SETTINGS)[0], reference)
    as_255 = torch.from_numpy(pixels).permute(2, 0, 1).float()
    with pytest.raises(DitfError, match="nothing is clipped"):
        model.features(as_255, **SETTINGS)
    assert torch.equal(model.features(as_255, value_range=(0, 255), **SETTINGS)[0], reference)
    half = (torch.from_numpy(pixels).float() / 255).to(torch.bfloat16)  # widened exactly, then rounded to 8 bits
    assert model.features(half, **SETTINGS)[0].shape == reference.shape


@pytest.mark.parametrize("bad, options, message", [
    (np.full((32, 48, 3), np.nan, dtype=np.float32), {}, "NaN or inf"),
    (np.full((32, 48, 3), np.inf, dtype=np.float32), {}, "NaN or inf"),
    (np.full((32, 48, 3), -0.5, dtype=np.float32), {}, "outside value_range"),
    (np.zeros((0, 0, 3), dtype=np.uint8), {}, "must have pixels"),
    ("meta", {}, "meta device"),
    (np.zeros((32, 48, 3), dtype=np.uint8), {"t": 1.5}, "t must be an integer"),
    (np.zeros((32, 48, 3), dtype=np.uint8), {"t": 1000}, r"t must be in 0\.\.999"),
    (np.zeros((32, 48, 3), dtype=np.uint8), {"k": -1}, "k must be in"),
    (np.zeros((32, 48, 3), dtype=np.uint8), {"value_range": (1, 0)}, "low < high"),
    (np.zeros((32, 48, 3), dtype=np.uint8), {"value_range": (-1, 1)}, "uint8 image holds 0..255"),
    (np.zeros((32, 48, 3), dtype=np.uint8), {"keys": ["a", "b"]}, "one per image"),
    (np.zeros((32, 48, 3), dtype=np.uint8), {"prompt": ["a", "b"]}, "one per image"),
])
def test_bad_input_is_one_error(model, bad, options, message):
    if isinstance(bad, str):
        bad = torch.empty((3, 32, 48), device="meta")
    with pytest.raises(DitfError, match=message):
        model.features(bad, **options, **SETTINGS)


def test_a_batch_tensor_is_its_images(model):
    batch = torch.from_numpy(np.stack([_pixels(0), _pixels(1)])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    maps = model.features(batch, **SETTINGS)
    assert len(maps) == 2
    each = model.features([batch[0], batch[1]], **SETTINGS)
    assert all(torch.equal(a, b) for a, b in zip(maps, each))


def test_empty_prompt_is_the_empty_prompt(model):
    image = Image.fromarray(_pixels(2))
    empty = model.features(image, prompt="", **SETTINGS)[0]
    assert torch.equal(empty, model.features(image, prompt="none", **SETTINGS)[0])
    assert not torch.equal(empty, model.features(image, **SETTINGS)[0])  # the default is the template


def test_per_image_prompts_share_one_store(model, tmp_path):
    store = tmp_path / "s.zarr"
    cat, dog = Image.fromarray(_pixels(0)), Image.fromarray(_pixels(1))
    as_cat = model.features(cat, prompt="a photo of a cat", store=store, **SETTINGS)[0]
    model.features(dog, prompt="a photo of a dog", store=store, **SETTINGS)
    listed = model.features([cat, dog], prompt=["a photo of a cat", "a photo of a dog"], store=store, **SETTINGS)
    called = model.features([cat, dog], prompt=lambda image: "a photo of a cat" if image is cat else "a photo of a dog",
                            store=store, **SETTINGS)
    assert torch.equal(listed[0], as_cat) and all(torch.equal(a, b) for a, b in zip(listed, called))
    # a prompt is part of what a row was computed from: the same image under another prompt is another row
    as_dog = model.features(cat, prompt="a photo of a dog", store=store, **SETTINGS)[0]
    assert not torch.equal(as_cat, as_dog)
    reader = open_store(store)
    keys = reader.images("folder")
    assert len(keys) == 3 and all("~p" in key for key in keys)
    (_, _, k, t), = reader.keys("folder")
    assert reader.store.open_features("folder", "tiny-flux", k, t).config["prompt"].startswith("per-image")
    assert torch.equal(as_cat, model.features(cat, prompt="a photo of a cat", store=tmp_path / "new.zarr", **SETTINGS)[0])


def test_text_encoders_load_once_over_five_calls():
    model = DiTF.from_pretrained("tiny-flux")
    adapter, loads = model.adapter, []
    encode = adapter.encode_prompts

    def counted(prompts):
        loads.append(list(prompts))
        return encode(prompts)

    adapter.encode_prompts = counted
    image = Image.fromarray(_pixels(3))
    results = [model.features(image, prompt="a photo of a bird", **SETTINGS)[0] for _ in range(5)]
    assert loads == [["a photo of a bird"]]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_without_store_equals_the_stored_path(model, tmp_path):
    """Without `store=` the features stay in memory: the same numbers as the stored path, z rounded to float16 in both."""
    image = Image.fromarray(_pixels(4))
    for variant in ("raw", "adaln+cd"):
        assert torch.equal(model.features(image, variant=variant, **SETTINGS)[0],
                           model.features(image, variant=variant, store=tmp_path / "s.zarr", **SETTINGS)[0])


@pytest.mark.parametrize("variant", ["raw", "adaln", "adaln+cd", "adaln+cd-post", "adaln-t", "adaln-c"])
def test_the_in_memory_path_is_the_stored_path_bit_for_bit(model, tmp_path, monkeypatch, variant):
    """Several images, blocks and timesteps, every variant and "auto" channels: equal to the stored
    path, z included as the float16 the store keeps; and nothing is written without `store=`."""
    images = [Image.fromarray(_pixels(seed, size)) for seed, size in ((5, (48, 32)), (6, (32, 48)), (7, (48, 32)))]
    options = {**SETTINGS, "ensemble_size": 2, "k": [0, 1], "t": [260, 500], "variant": variant}
    stored = model.features(images, store=tmp_path / f"{variant}.zarr", **options)

    import ditf_pipeline.store.feature_store as feature_store

    def refuse(*args, **kwargs):
        raise AssertionError("a store was opened without store=")

    monkeypatch.setattr(feature_store.FeatureStore, "__init__", refuse)
    in_memory = model.features(images, **options)
    assert list(in_memory) == list(stored) == [(0, 260), (1, 260), (0, 500), (1, 500)]
    for key, maps in stored.items():
        assert len(in_memory[key]) == len(maps) == 3
        for a, b in zip(in_memory[key], maps):
            assert torch.equal(a, b)
    if variant == "raw":  # z itself: float16 values, as the store holds them
        z = in_memory[(1, 260)][0]
        assert torch.equal(z, z.half().float()) and not torch.equal(z, torch.zeros_like(z))


def test_from_pretrained_takes_a_pipeline_folder_and_hub_options(model, tmp_path):
    folder = model.adapter.save_pipeline(tmp_path / "tiny-flux-pipe")  # diffusers' save_pretrained layout
    assert (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file()
    loaded = DiTF.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    assert loaded.name == "tiny-flux" and loaded.adapter.source == str(folder)
    assert loaded.adapter.dtype == torch.float32 and loaded.adapter.hub_options == {"local_files_only": True}
    image = Image.fromarray(_pixels(5))
    assert torch.equal(loaded.features(image, **SETTINGS)[0], model.features(image, **SETTINGS)[0])


def test_from_pretrained_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("black-forest-labs/FLUX.1-dev") == ("flux", None)
    assert resolve_model("tiny-flux") == ("tiny-flux", None)
    flux = DiTF.from_pretrained("black-forest-labs/FLUX.1-dev", dtype="bfloat16", device="cpu")  # weights load lazily
    assert flux.name == "flux" and flux.adapter.dtype == torch.bfloat16
    with pytest.raises(DitfError, match="neither a model name"):
        DiTF.from_pretrained("someone/not-a-model", cache_dir=tmp_path)
    with pytest.raises(DitfError, match="not a diffusers pipeline folder"):
        DiTF.from_pretrained(str(tmp_path))
    with pytest.raises(DitfError, match="disagree"):
        DiTF.from_pretrained("tiny-flux", dtype="fp16", torch_dtype=torch.float32)
    with pytest.raises(DitfError, match="dtype"):
        DiTF.from_pretrained("tiny-flux", dtype="int8")


def test_per_image_rows_must_name_their_prompt(model, tmp_path):
    """The extractor itself refuses a per-image row whose key does not carry its prompt's digest."""
    from ditf_pipeline.extract.prompts import PER_IMAGE, per_image_key, prompts_for
    from ditf_pipeline.datasets.base import ImageRecord

    good = ImageRecord(key=per_image_key("cat", "a cat"), path=tmp_path / "cat.png", prompt="a cat")
    assert prompts_for([good], PER_IMAGE) == {good.key: "a cat"}
    with pytest.raises(DitfError, match="does not name the digest"):
        prompts_for([ImageRecord(key=per_image_key("cat", "a dog"), path=tmp_path / "cat.png", prompt="a cat")], PER_IMAGE)
    with pytest.raises(DitfError, match="needs a prompt for every image"):
        prompts_for([ImageRecord(key="cat", path=tmp_path / "cat.png")], PER_IMAGE)


def test_a_store_url_is_handed_on_as_given(model, tmp_path, monkeypatch):
    """`store="s3://..."` goes to the store's URL parser; a Path would fold it into a local "s3:" folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DitfError, match="unknown URL scheme memory://"):
        model.features(Image.fromarray(_pixels(0)), store="memory://bucket/x.zarr", **SETTINGS)
    assert list(tmp_path.iterdir()) == []


def test_a_named_key_given_other_pixels_is_refused(model, tmp_path):
    store = tmp_path / "s.zarr"
    first = model.features(Image.fromarray(_pixels(0)), keys=["cat"], store=store, **SETTINGS)[0]
    with pytest.raises(DitfError, match="'cat' of folder .* was extracted from another image"):
        model.features(Image.fromarray(_pixels(1)), keys=["cat"], store=store, **SETTINGS)
    with pytest.raises(DitfError, match="two different images are given the key 'dog'"):
        model.features([Image.fromarray(_pixels(0)), Image.fromarray(_pixels(1))], keys=["dog", "dog"], store=store,
                       **SETTINGS)
    assert torch.equal(first, open_store(store).features("folder", "tiny-flux", image="cat"))
