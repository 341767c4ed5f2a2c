"""Training checkpoints of the probe: resumable bit for bit on the CPU, no pickle anywhere.

``<out>/checkpoint/``: ``state-<step>.safetensors`` (head + AdamW tensors) and ``state.json``
(step, epoch, settings, RNG state as plain ints, SHA-256 of the tensor file), written tensor
file first, JSON last, both by atomic rename. A checkpoint of other settings is refused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import DitfError
from ..store.feature_store import config_differences
from .files import atomic_write_bytes, sha256_of
from .head import LinearHead

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "ditf-probe-checkpoint/1"


def _state_tensors(head: LinearHead, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"head/{name}": value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"opt/{index}/{name}"] = value.detach().cpu().contiguous()
    return tensors


def _torch_rng() -> list[int]:
    return [int(v) for v in torch.get_rng_state().tolist()]


def save_checkpoint(folder: Path, head: LinearHead, optimizer, step: int, epoch: int, identity: dict) -> Path:
    """Write the state after `step` into `folder` (older tensor files removed once it is complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensor_path = folder / f"state-{step:09d}.safetensors"
    tmp = tensor_path.with_name(f".{tensor_path.name}.tmp{os.getpid()}")
    save_file(_state_tensors(head, optimizer), str(tmp), metadata={"format": CHECKPOINT_FORMAT, "step": str(step)})
    os.replace(tmp, tensor_path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "epoch": epoch,
        "tensors": tensor_path.name,
        "sha256": sha256_of(tensor_path),
        "identity": identity,
        "rng": {"torch_cpu": _torch_rng(), "order": "numpy default_rng([seed, epoch]).permutation (stateless)"},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_bytes(folder / "state.json", json.dumps(state, indent=1).encode())
    for old in folder.glob("state-*.safetensors"):
        if old.name != tensor_path.name:
            old.unlink(missing_ok=True)
    return folder / "state.json"


def load_checkpoint(folder: Path, head: LinearHead, optimizer, identity: dict) -> tuple[int, int] | None:
    """Restore head, optimiser and RNG from `folder`; (step, epoch), or None when there is none."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DitfError(f"checkpoint {state_path} is not valid JSON ({exc}): pass --no-resume to start over") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DitfError(f"checkpoint {state_path} is not a ditf probe checkpoint: pass --no-resume to start over")
    differences = config_differences(state.get("identity", {}), json.loads(json.dumps(identity)))
    if differences:
        raise DitfError(
            f"checkpoint {state_path} was written with other settings ({'; '.join(differences)}): "
            "pass --no-resume to start over, or another --out"
        )
    name = state.get("tensors")
    if not isinstance(name, str) or "/" in name or "\\" in name or not name.startswith("state-"):
        raise DitfError(f"checkpoint {state_path}: field 'tensors' must name a state-*.safetensors file, got {name!r}")
    tensor_path = folder / name
    if not tensor_path.is_file() or sha256_of(tensor_path) != state.get("sha256"):
        raise DitfError(f"checkpoint {tensor_path} is missing or does not match {state_path}: pass --no-resume")
    step, epoch = state.get("step"), state.get("epoch")
    if not isinstance(step, int) or not isinstance(epoch, int) or step < 0:
        raise DitfError(f"checkpoint {state_path}: 'step' and 'epoch' must be non-negative integers")
    tensors = load_file(str(tensor_path))
    head_state = {name[5:]: value for name, value in tensors.items() if name.startswith("head/")}
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as exc:
        raise DitfError(f"checkpoint {tensor_path} does not fit this head: {exc}") from exc
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt/"):
            _, index, key = name.split("/", 2)
            opt_state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    rng = state.get("rng", {}).get("torch_cpu")
    if isinstance(rng, list) and rng:
        torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))
    return step, epoch
