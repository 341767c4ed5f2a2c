"""Which text each image is conditioned on (`--prompt template | captions:FILE | text:STRING | none`,
and `per-image`: each record's own prompt, as the Python API passes them).

The authors condition Flux on a per-image MLLM caption read from a JSON file keyed by
category + image name; the category template is the documented alternative (~0.3 PCK lower).
Caption files are data: parsed with `json`, never evaluated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from ..datasets.base import ImageRecord
from ..core.errors import DitfError

TEMPLATE = "a photo of a {category}"
#: the prompt mode of images that carry their own text (`ImageRecord.prompt`): one key serves
#: any number of prompts, and each row's image key names the digest of its prompt (`prompt_digest`)
PER_IMAGE = "per-image"


def prompt_digest(text: str) -> str:
    """12 hex digits naming a prompt text (in the image keys of per-image prompts)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_prompt_mode(mode: str) -> tuple[str, Path | None]:
    if mode in ("template", "none", PER_IMAGE):
        return mode, None
    if mode.startswith("text:"):
        return "text", None
    if mode.startswith("captions:"):
        path = Path(mode.split(":", 1)[1])
        if not path.is_file():
            raise DitfError(f"caption file {path} does not exist")
        return "captions", path
    raise DitfError(f"unknown --prompt {mode!r}: use template, captions:FILE, text:STRING or none")


def per_image_key(key: str, text: str) -> str:
    """The row key of image `key` under its own prompt `text`: the key, "~p" and the prompt's digest."""
    return f"{key}~p{prompt_digest(text)}"


def _per_image(records: Sequence[ImageRecord]) -> dict[str, str]:
    """Each record's own prompt; its key must name that prompt's digest, so a row can never hold
    features computed under another prompt than the one its key says."""
    missing = [record.key for record in records if record.prompt is None]
    if missing:
        raise DitfError(f"--prompt {PER_IMAGE} needs a prompt for every image ({missing[0]} has none): "
                        "per-image prompts are given through the Python API (DiTF.features(prompt=[...]))")
    for record in records:
        if not record.key.endswith(f"~p{prompt_digest(record.prompt)}"):
            raise DitfError(f"image key {record.key!r} does not name the digest of its prompt "
                            f"(expected it to end in ~p{prompt_digest(record.prompt)}: `per_image_key`)")
    return {record.key: record.prompt for record in records}


def _caption_keys(record: ImageRecord) -> list[str]:
    category = record.category or ""
    names = [record.path.name, record.path.stem]
    return [f"{category}{sep}{name}" for sep in ("", "+", "/") for name in names] + names


def prompts_for(records: Sequence[ImageRecord], mode: str) -> dict[str, str]:
    """Image key -> prompt text."""
    kind, path = parse_prompt_mode(mode)
    if kind == "none":
        return {record.key: "" for record in records}
    if kind == PER_IMAGE:
        return _per_image(records)
    if kind == "text":  # one literal prompt for every image (DiTF's DAVIS script: "a photo of a image")
        text = mode.split(":", 1)[1]
        return {record.key: text for record in records}
    if kind == "template":
        return {record.key: TEMPLATE.format(category=(record.category or "object").replace("_", " ")) for record in records}
    try:
        captions = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DitfError(f"caption file {path} is not valid JSON: {exc}") from exc
    if not isinstance(captions, dict):
        raise DitfError(f"caption file {path} must hold a JSON object keyed by category+imname")
    out = {}
    for record in records:
        for key in _caption_keys(record):
            if isinstance(captions.get(key), str):
                out[record.key] = captions[key]
                break
        else:
            raise DitfError(f"caption file {path} has no caption for {record.category}+{record.path.name}")
    return out


def prompt_identity(mode: str) -> str:
    """A stable description of the prompt setting for the store config (file content hashed)."""
    kind, path = parse_prompt_mode(mode)
    if kind == "text":
        return mode
    if kind == PER_IMAGE:
        return f"{PER_IMAGE} (each image key ends in its prompt's digest)"
    if path is None:
        return kind
    return f"captions:{path.name}:sha256={hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
