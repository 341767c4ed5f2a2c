"""The dataset card of a pack (`README.md` with the Hugging Face Hub's YAML header).

Features are derived from a model's weights and a dataset's images, so whoever reuses them is
bound by both licences: the card names each source's licence as far as ditf knows it (a table
kept here; "unknown" where the source states no licence ditf can name) and the YAML `license`
is that licence when every source agrees, else `other` (the uploader may set it with
`ditf pack --license`). Each key's full extraction config is listed, so a reader can check the
features were computed as the paper's tables need.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

__all__ = ["MODEL_LICENSES", "DATASET_LICENSES", "card"]

#: model -> (Hub licence id, licence name or link for `other`); random-weight test models have none
MODEL_LICENSES: Mapping[str, tuple[str, str]] = {
    "flux": ("other", "FLUX.1 [dev] Non-Commercial License (black-forest-labs/FLUX.1-dev)"),
    "flux-schnell": ("apache-2.0", "Apache 2.0 (black-forest-labs/FLUX.1-schnell)"),
    "sd3": ("other", "Stability AI Community License (stabilityai/stable-diffusion-3-medium)"),
    "sd3.5": ("other", "Stability AI Community License (stabilityai/stable-diffusion-3.5-large)"),
    "pixart-alpha": ("openrail++", "CreativeML Open RAIL++-M (PixArt-alpha/PixArt-XL-2-1024-MS)"),
    "sd2.1": ("openrail++", "CreativeML Open RAIL++-M (Stable Diffusion 2.1)"),
}
#: dataset -> licence as its authors state it ("unknown": no licence ditf can name; see their terms)
DATASET_LICENSES: Mapping[str, tuple[str, str]] = {}


def _licence(table: Mapping[str, tuple[str, str]], name: str) -> tuple[str, str] | None:
    if name.startswith("tiny-"):
        return None  # built-in random weights: nothing inherited
    if name.startswith("dinov2-"):
        return ("apache-2.0", "Apache 2.0 (facebook/dinov2)")
    return table.get(name, ("unknown", "unknown: see the source's own terms"))


def card(keys: Sequence[Mapping], *, version: str, total_bytes: int, license: str | None = None) -> str:
    """The card's text; `keys`: each key's node, images, bytes, config and predictions (the manifest's items)."""
    sources: dict[str, tuple[str, str]] = {}
    for key in keys:
        dataset, model = key["node"].split("/")[:2]
        for name, found in ((f"model {model}", _licence(MODEL_LICENSES, model)),
                            (f"dataset {dataset}", _licence(DATASET_LICENSES, dataset))):
            if found is not None:
                sources[name] = found
    ids = {lid for lid, _ in sources.values()}
    chosen = license or (ids.pop() if len(ids) == 1 and "unknown" not in ids else "other")
    header = [
        "---",
        f"license: {chosen}",
        "pretty_name: ditf feature cache",
        "tags:",
        "- ditf",
        "- diffusion-transformer",
        "- features",
        "- zarr",
        "---",
    ]
    lines = [
        "# ditf feature cache",
        "",
        f"Diffusion Transformer features cached by ditf {version} ({total_bytes / 1e9:.2f} GB), in a Zarr v3 store",
        "with consolidated metadata: read it without downloading it first (upload this folder with `hf upload`), e.g.",
        "",
        "```",
        "ditf score --store hf://datasets/<org>/<name>/ditf.zarr --predictions-store local.zarr ...",
        "```",
        "",
        "## Keys",
        "",
        "| key | images | size (MB) | predictions |",
        "| --- | --- | --- | --- |",
    ]
    for key in keys:
        predictions = ", ".join(key.get("predictions") or []) or "none"
        lines.append(f"| {key['node']} | {key.get('images')} | {key['bytes'] / 1e6:.1f} | {predictions} |")
    lines += ["", "## Licences of the sources", "",
              "Features are derived from the model's weights and the dataset's images: both licences apply.", ""]
    if sources:
        lines += ["| source | licence |", "| --- | --- |"]
        lines += [f"| {name} | {text} |" for name, (_, text) in sorted(sources.items())]
    else:
        lines.append("Every model here has built-in random weights (a test cache): no licence is inherited.")
    lines += ["", "## Config of each key", ""]
    for key in keys:
        lines += [f"### {key['node']}", "", "```json", json.dumps(key.get("config"), indent=2, sort_keys=True), "```", ""]
    return "\n".join(header + lines) + "\n"
