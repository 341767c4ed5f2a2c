"""Importing ditf changes no process-wide configuration of zarr or torch.

A library imported into someone's notebook must not change how their own zarr arrays are
written or how their torch runs: every module of `ditf_pipeline` and `ditf_cli` is imported in
a fresh interpreter, and zarr's configuration and torch's global settings are compared before
and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import copy, importlib, json, pkgutil, sys
    import torch, zarr

    def torch_state():
        return {
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "default_dtype": str(torch.get_default_dtype()),
            "grad_enabled": torch.is_grad_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "anomaly": torch.is_anomaly_enabled(),
            "cudnn": [torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32],
            "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "module_methods": [id(torch.nn.Module.register_parameter), id(torch.nn.Module.register_buffer),
                               id(torch.nn.Module.__init__)],
            "default_device": str(torch.get_default_device()),
        }

    def zarr_state():
        return json.loads(json.dumps(copy.deepcopy(zarr.config.config), default=str))

    before = {"zarr": zarr_state(), "torch": torch_state()}
    imported, skipped = [], []
    for package in ("ditf_pipeline", "ditf_cli"):
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
        for name in names:
            try:
                importlib.import_module(name)
                imported.append(name)
            except ModuleNotFoundError as exc:  # an optional extra that is not installed
                if exc.name and exc.name.split(".")[0] in ("ditf_pipeline", "ditf_cli"):
                    raise
                skipped.append(f"{name}: {exc.name}")
    after = {"zarr": zarr_state(), "torch": torch_state()}
    print(json.dumps({"before": before, "after": after, "imported": imported, "skipped": skipped}))
""")


def test_importing_every_ditf_module_leaves_zarr_and_torch_configuration_unchanged():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ditf_pipeline.store.feature_store" in report["imported"]
    assert "ditf_pipeline.store.backends.object" in report["imported"]
    assert len(report["imported"]) > 60, report["skipped"]  # really every module, not a few
    assert report["after"]["zarr"] == report["before"]["zarr"]
    assert report["after"]["torch"] == report["before"]["torch"]


def test_only_the_fault_injection_module_reads_the_crash_test_variables():
    """The kill points of the crash tests live in `store/faults.py` alone, not in the write path."""
    from pathlib import Path

    import ditf_pipeline

    root = Path(ditf_pipeline.__file__).parent
    readers = sorted(str(path.relative_to(root)) for path in root.rglob("*.py")
                     if any(name in path.read_text(encoding="utf-8")
                            for name in ("DITF_KILL_AT_WRITE", "DITF_WRITE_COUNT_FILE", "DITF_KILL_MARKER")))
    assert readers == ["store/faults.py"]
