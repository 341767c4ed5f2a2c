"""Faults, hostile input and untrusted files: what the failure-behaviour section promises.

Image and annotation parsing have their own matrices (test_images.py, test_datasets.py,
test_pfpascal.py, test_ap10k.py, test_davis.py, test_probe.py); this file covers the whole
pipeline: crashes at random points, a full or read-only disk, a second writer, odd paths,
stores from elsewhere, and code that must never unpickle or evaluate data.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from ditf_pipeline.datasets import get_dataset
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
from ditf_pipeline.models import load_adapter
from ditf_pipeline.store.feature_store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ditf_cli.main", *map(str, args)], capture_output=True, text=True,
                          env=ENV, **kwargs)


def _arrays(store: Path, key: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")[key]
    return {name: array[:] for name, array in group.arrays()}


def _extract(root, store, **overrides):
    settings = dict(ks=[1, 3], ts=[260], img_size=96, ensemble_size=2)
    settings.update(overrides)
    extractor = Extractor(load_adapter("tiny-flux", device="cpu"), FeatureStore(store), ExtractSettings(**settings))
    return extractor.run(get_dataset("spair", root, "test"), progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_spair_demo(tmp_path_factory.mktemp("hard") / "SPair", categories=("cat", "car", "dog"), pairs_per_category=6)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Three images: enough for the in-process writer tests, cheap to extract."""
    return make_spair_demo(tmp_path_factory.mktemp("hard-small") / "SPair", categories=("cat",), pairs_per_category=2)


@pytest.fixture(scope="module")
def demo(root, tmp_path_factory):
    """The data and a store extracted by the CLI (a subprocess: the expensive part)."""
    clean = tmp_path_factory.mktemp("hard-store") / "clean.zarr"
    args = ["--model", "tiny-flux", "--data-root", root, "--k", "1", "--k", "3", "--img-size", "128",
            "--ensemble-size", "4", "--dtype", "fp32", "--no-progress"]
    assert _cli("extract", *args, "--store", clean).returncode == 0
    return root, clean, args


# ---- crashes -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_kill_at_random_points_then_resume_equals_clean_run(demo, tmp_path, trial):
    """kill -9 at a seeded random moment (metadata creation, mid-chunk, between images, ...)."""
    root, clean, args = demo
    delay = random.Random(trial).uniform(0.0, 2.5)
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "ditf_cli.main", "extract", *map(str, args), "--store", str(store)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not store.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # imports done, the run has started writing
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _cli("extract", *args, "--store", store)
    assert resumed.returncode == 0, resumed.stderr
    for k in (1, 3):
        key = f"spair/tiny-flux/k{k}/t260"
        got, want = _arrays(store, key), _arrays(clean, key)
        assert got.keys() == want.keys()
        for name in want:
            assert np.array_equal(got[name], want[name]), (trial, key, name)
    doctor = _cli("doctor", "--store", store, "--data-root", root)
    assert doctor.returncode == 0, doctor.stdout


@pytest.mark.slow
def test_kill_during_match_then_resume_equals_clean_run(demo, tmp_path):
    root, clean, _ = demo
    import shutil

    killed, reference = tmp_path / "killed.zarr", tmp_path / "reference.zarr"
    shutil.copytree(clean, killed)
    shutil.copytree(clean, reference)
    match_args = ["match", "--model", "tiny-flux", "--data-root", root, "--k", "3", "--variant", "adaln+cd",
                  "--no-progress"]
    assert _cli(*match_args, "--store", reference).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "ditf_cli.main", *map(str, match_args), "--store", str(killed)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = killed / "spair" / "tiny-flux" / "k3" / "t260" / "predictions"
    deadline = time.time() + 120
    while not predictions.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)  # the predictions group is created right before matching starts
    time.sleep(random.Random(7).uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _cli(*match_args, "--store", killed).returncode == 0
    ((name, _),) = FeatureStore(reference, read_only=True).prediction_groups("spair", "tiny-flux", 3, 260)
    key = f"spair/tiny-flux/k3/t260/predictions/{name}"
    got, want = _arrays(killed, key), _arrays(reference, key)
    assert got["done"].all()
    assert np.array_equal(got["pred"], want["pred"], equal_nan=True)


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c_and_the_rerun_completes(small_root, tmp_path):
    """SIGTERM (SLURM's time limit) right before a store write: the resume hint and exit 143, no
    traceback; the plain rerun completes and the store is clean."""
    store = tmp_path / "s.zarr"
    args = ["extract", "--model", "tiny-flux", "--data-root", small_root, "--k", "1", "--img-size", "64",
            "--ensemble-size", "1", "--dtype", "fp32", "--no-progress", "--store", store]
    marker = tmp_path / "signalled-at"
    env = {**ENV, "DITF_KILL_AT_WRITE": "20", "DITF_KILL_SIGNAL": "TERM", "DITF_KILL_MARKER": str(marker)}
    stopped = subprocess.run([sys.executable, "-m", "ditf_cli.main", *map(str, args)], capture_output=True,
                             text=True, env=env)
    assert marker.read_text() == "20"  # it was running, right before that write
    assert stopped.returncode == 143, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "terminated (SIGTERM): completed images are kept; rerun the same command to resume")
    assert _cli(*args).returncode == 0
    assert _cli("doctor", "--store", store, "--data-root", small_root).returncode == 0


# ---- disk full, read-only store, second writer -----------------------------------------------------
def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs; False where that is impossible (not root). Under CI=true (CI runs as root)
    a failed mount fails the test instead of skipping it silently."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0 and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but tmpfs cannot be mounted: {result.stderr.decode(errors='replace').strip()}")
    return result.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_disk_full_is_one_line_store_stays_readable_and_rerun_completes(demo, tmp_path):
    root, clean, args = demo
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "size=400k"):  # fills about half-way through the images
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        store = mount / "s.zarr"
        full = _cli("extract", *args, "--store", store)
        assert full.returncode == 1, full.stdout + full.stderr
        assert "cannot write to store" in full.stderr and "Traceback" not in full.stderr
        assert "No space left" in full.stderr
        complete = zarr.open_group(str(store), mode="r")["spair/tiny-flux/k1/t260/complete"][:]
        assert 0 < complete.sum() < len(complete)  # some work was committed before the disk filled
        doctor = _cli("doctor", "--store", store)
        assert doctor.returncode == 0, doctor.stdout  # every committed image is readable
        # free space: move the store somewhere roomy and resume
        import shutil

        moved = tmp_path / "moved.zarr"
        shutil.copytree(store, moved)
    finally:
        _umount(mount)
    assert _cli("extract", *args, "--store", moved).returncode == 0
    for name, want in _arrays(clean, "spair/tiny-flux/k3/t260").items():
        assert np.array_equal(_arrays(moved, "spair/tiny-flux/k3/t260")[name], want), name


@pytest.mark.slow
def test_read_only_store_is_refused_in_one_line_and_can_be_scored(demo, tmp_path):
    root, clean, args = demo
    import shutil

    writable = tmp_path / "w.zarr"
    shutil.copytree(clean, writable)
    assert _cli("match", "--model", "tiny-flux", "--data-root", root, "--k", "3", "--store", writable,
                "--no-progress").returncode == 0
    mount = tmp_path / "ro"
    if not _mount_tmpfs(mount, "size=20m"):
        pytest.skip("cannot mount tmpfs here (needs root)")
    try:
        shutil.copytree(writable, mount / "s.zarr")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        extra = _cli("extract", *args, "--store", mount / "s.zarr", "--t", "90")
        assert extra.returncode == 1 and "cannot write to store" in extra.stderr, extra.stderr
        assert "Read-only" in extra.stderr and "Traceback" not in extra.stderr
        scored = _cli("score", "--model", "tiny-flux", "--data-root", root, "--k", "3", "--store", mount / "s.zarr")
        assert scored.returncode == 0, scored.stderr
    finally:
        _umount(mount)


def test_second_writer_on_the_same_key_is_refused_without_damage(small_root, tmp_path):
    root = small_root
    store_path = tmp_path / "s.zarr"
    _extract(root, store_path, ks=[1], img_size=64, ensemble_size=1)
    before = _arrays(store_path, "spair/tiny-flux/k1/t260")
    # another process holds the key (as a running extract does) until told to stop
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ditf_pipeline.store.feature_store import FeatureStore\n"
         f"with FeatureStore({str(store_path)!r}).writer_lock('spair', 'tiny-flux', 1, 90):\n"
         "    print('locked', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DitfError, match="another process is extracting spair/tiny-flux/k1/t90"):
            _extract(root, store_path, ks=[1], ts=[90], img_size=64, ensemble_size=1)
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    for name, value in _arrays(store_path, "spair/tiny-flux/k1/t260").items():
        assert np.array_equal(value, before[name])
    report = _extract(root, store_path, ks=[1], ts=[90], img_size=64, ensemble_size=1)  # lock released: works
    assert report.extracted == report.n_images


@pytest.mark.slow
# ---- odd paths, stores from elsewhere ---------------------------------------------------------------
def test_unicode_and_spaces_in_paths(tmp_path):
    base = tmp_path / "données ü" / "with space"
    root = make_spair_demo(base / "SPair 71k", pairs_per_category=2)
    store = base / "my store.zarr"
    result = _cli("run", "--model", "tiny-flux", "--data-root", root, "--store", store, "--img-size", "64",
                  "--ensemble-size", "1", "--no-progress", "--format", "json", "--out", base / "résultat.json")
    assert result.returncode == 0, result.stderr
    assert [r["n_pairs"] for r in json.loads((base / "résultat.json").read_text())] == [4]


def test_store_from_a_newer_schema_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    FeatureStore(store)
    zarr.open_group(str(store), mode="a").attrs["ditf_schema_version"] = 99
    with pytest.raises(DitfError, match="schema version 99"):
        FeatureStore(store)
    with pytest.raises(DitfError, match="schema version 99"):
        FeatureStore(store, read_only=True)


def test_same_key_written_by_another_model_source_is_refused(small_root, tmp_path):
    """Same model name and key, other weights (a saved copy with another seed): refused, named."""
    root = small_root
    store_path = tmp_path / "s.zarr"
    _extract(root, store_path, ks=[1], img_size=64, ensemble_size=1)
    other = load_adapter("tiny-flux", device="cpu")
    weights = other.save_pipeline(tmp_path / "other-weights")
    adapter = load_adapter("tiny-flux", weights=str(weights), device="cpu")
    extractor = Extractor(adapter, FeatureStore(store_path), ExtractSettings(ks=[1], ts=[260], img_size=64, ensemble_size=1))
    with pytest.raises(DitfError, match=r"another configuration \(source:"):
        extractor.run(get_dataset("spair", root, "test"), progress=False)


@pytest.mark.slow
def test_missing_features_for_pairs_and_mismatched_dataset_are_one_line(demo, tmp_path):
    root, clean, _ = demo
    other = make_spair_demo(tmp_path / "Other", categories=("bird",), pairs_per_category=2)
    result = _cli("match", "--model", "tiny-flux", "--data-root", other, "--k", "3", "--store", clean, "--no-progress")
    assert result.returncode == 1 and "have no features" in result.stderr and "Traceback" not in result.stderr
    result = _cli("match", "--model", "tiny-flux", "--data-root", root, "--k", "3", "--store", clean,
                  "--variant", "nope", "--no-progress")
    assert result.returncode == 1 and "unknown variant" in result.stderr


# ---- untrusted files ------------------------------------------------------------------------------
def _unsafe_calls(source: str) -> list[tuple[int, str]]:
    """Line numbers of code that could run data: unpickling modules, eval/exec, torch.load, ..."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in filter(None, names):
                if name.split(".")[0] in {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}:
                    found.append((node.lineno, f"import {name}"))
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if isinstance(func, ast.Name) and name in {"eval", "exec"}:
                found.append((node.lineno, name))
            if (owner, name) in {("torch", "load"), ("yaml", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle")}:
                found.append((node.lineno, f"{owner}.{name}"))
            for keyword in node.keywords:
                if keyword.arg in {"allow_pickle", "weights_only", "trust_remote_code"} and isinstance(keyword.value, ast.Constant):
                    if keyword.value.value is (keyword.arg != "weights_only"):
                        found.append((node.lineno, f"{keyword.arg}={keyword.value.value}"))
    return found


def test_no_pickle_or_eval_of_data_anywhere():
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for folder in ("ditf_pipeline", "cli", "benchmarks")
        for path in (REPO / folder).rglob("*.py")
        for line, what in _unsafe_calls(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "\n".join(offenders)
    # the scanner itself finds what it must
    assert [w for _, w in _unsafe_calls("import pickle\nx = eval('1')\ntorch.load(f)\nnp.load(f, allow_pickle=True)")] == [
        "import pickle", "eval", "torch.load", "allow_pickle=True"]


def test_caption_file_is_data_not_code(tmp_path):
    from ditf_pipeline.extract.prompts import prompts_for

    root = make_spair_demo(tmp_path / "SPair", pairs_per_category=1)
    records = get_dataset("spair", root, "test").images()
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    captions = {f"{r.category}{r.path.name}": payload for r in records}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    prompts = prompts_for(records, f"captions:{tmp_path / 'captions.json'}")
    assert set(prompts.values()) == {payload} and not marker.exists()
    (tmp_path / "bad.json").write_text("{'python': 'dict'}")
    with pytest.raises(DitfError, match="not valid JSON"):
        prompts_for(records, f"captions:{tmp_path / 'bad.json'}")
