"""The bad-input matrix: every refused input costs exit 1, one `error:` line, no traceback, and
leaves every file under the test folder (store, data, outputs) byte-identical.

One store per module (tiny-flux at its default key plus a second timestep, predictions, and a
tiny-dinov2 key), commands run in-process through typer's CliRunner (much cheaper than a
subprocess each); a few cases also go through a real subprocess for the real exit code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.demo import make_spair_demo
from ditf_pipeline.core.errors import DitfError
from ditf_pipeline.selection import select_key
from ditf_pipeline.validate import PROTOCOLS, VARIANTS, did_you_mean


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args):
    result = _invoke(*args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def _snapshot(folder: Path) -> tuple[dict[str, str], set[str]]:
    """sha256 of every file and the set of folders: a refused command must change neither."""
    files, dirs = {}, set()
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_dir():
            dirs.add(name)
        else:
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files, dirs


def _edit_pair(root: Path, change) -> None:
    """Apply `change(dict)` to the first pair annotation of a SPair-layout root."""
    path = sorted((root / "PairAnnotation" / "test").glob("*.json"))[0]
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("bad-inputs")
    root = make_spair_demo(base / "SPair", categories=("cat",), pairs_per_category=2)
    store = base / "s.zarr"
    common = ["--data-root", root, "--store", store, "--no-progress"]
    tiny = ["--img-size", "64", "--ensemble-size", "1", *common]
    _ok("extract", "--model", "tiny-flux", *tiny)  # the model's default key, k2/t260
    _ok("extract", "--model", "tiny-flux", "--t", "90", *tiny)  # a second key: selection must pick the default
    _ok("match", "--model", "tiny-flux", *common)
    _ok("extract", "--model", "tiny-dinov2", *tiny)

    def broken(name: str, change) -> Path:
        copy = base / name
        shutil.copytree(root, copy)
        if change is not None:
            _edit_pair(copy, change)
        return copy

    def kp_outside(d):
        d["trg_kps"][0] = [d["trg_imsize"][0] + 40, 5]

    def box_inverted(d):
        x1, y1, x2, y2 = d["trg_bndbox"]
        d["trg_bndbox"] = [x2, y1, x1, y2]

    def box_negative(d):
        d["trg_bndbox"][0] = -10

    def size_mismatch(d):
        d["src_imsize"] = [d["src_imsize"][0] + 16, d["src_imsize"][1]]

    def unknown_category(d):
        d["category"] = "dragon"

    roots = {name: broken(name, change) for name, change in [
        ("kp-outside", kp_outside), ("box-inverted", box_inverted), ("box-negative", box_negative),
        ("size-mismatch", size_mismatch), ("unknown-category", unknown_category), ("truncated", None)]}
    roots["more-images"] = make_spair_demo(base / "More", categories=("cat", "dog"), pairs_per_category=2)
    image = sorted((roots["truncated"] / "JPEGImages").rglob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 2 // 3])  # header intact, pixels cut off
    (base / "out-dir").mkdir()
    (base / "a-file.txt").write_text("not a folder")
    return SimpleNamespace(base=base, root=root, store=store, roots=roots)


def _args(world, spec: str) -> list[str]:
    """A case's command line: {root}, {store}, {base} and {<broken root>} are filled in."""
    values = {"root": world.root, "store": world.store, "base": world.base,
              **{name.replace("-", "_"): path for name, path in world.roots.items()}}
    return [part.format(**values) for part in shlex.split(spec)]


FLUX = "--model tiny-flux --data-root {root} --store {store}"
DINO = "--model tiny-dinov2 --data-root {root} --store {store}"
EXTRACT = f"extract {FLUX} --img-size 64 --ensemble-size 1 --no-progress"

#: (command line, words the one error line must contain)
CASES = {
    # extract: ranges, devices, names (checked before the store is opened)
    "extract-img-size-negative": (f"{EXTRACT} --img-size -64", "--img-size must be at least the model's patch stride 16"),
    "extract-img-size-zero": (f"{EXTRACT} --img-size 0", "got 0"),
    "extract-img-size-below-stride": (f"{EXTRACT} --img-size 7", "multiples of 16"),
    "extract-ensemble-zero": (f"{EXTRACT} --ensemble-size 0", "--ensemble-size must be at least 1"),
    "extract-batch-zero": (f"{EXTRACT} --batch-size 0", "--batch-size must be at least 1"),
    "extract-batch-negative": (f"{EXTRACT} --batch-size -1", "--batch-size must be at least 1, got -1"),
    "extract-workers-zero": (f"{EXTRACT} --workers 0", "--workers must be at least 1"),
    "extract-batch-images-zero": (f"{EXTRACT} --batch-images 0", "--batch-images must be at least 1"),
    "extract-compile": (f"{EXTRACT} --compile yes", "unknown --compile 'yes'"),
    "extract-compile-offload": (f"{EXTRACT} --compile on --offload", "--compile on cannot be combined with --offload"),
    "extract-t-1000": (f"{EXTRACT} --t 1000", "--t must be a timestep in 0..999, got 1000"),
    "extract-t-negative": (f"{EXTRACT} --t -1", "0..999"),
    "extract-k-out-of-range": (f"{EXTRACT} --k 99", "block index 99 is out of range"),
    "extract-k-negative": (f"{EXTRACT} --k -1", "--k must be a block index >= 0"),
    "extract-device-tpu": (f"{EXTRACT} --device tpu", "unknown device 'tpu'"),
    "extract-dtype": (f"{EXTRACT} --dtype fp8", "unknown dtype 'fp8'"),
    "extract-resize": (f"{EXTRACT} --resize diagonal", "unknown --resize side 'diagonal'"),
    "extract-model-typo": (f"{EXTRACT} --model flx", "unknown model 'flx' (did you mean 'flux'?)"),
    "extract-dataset-typo": (f"{EXTRACT} --dataset spiar", "unknown dataset 'spiar' (did you mean 'spair'?)"),
    "extract-no-root": (f"{EXTRACT} --data-root /no/such/dir", "dataset root /no/such/dir does not exist"),
    "extract-config-conflict": (f"{EXTRACT} --ensemble-size 2", "ensemble_size: 1 -> 2"),
    "extract-config-conflict-new-images": (f"{EXTRACT} --data-root {{more_images}} --ensemble-size 2", "ensemble_size: 1 -> 2"),
    # annotations and images
    "extract-keypoint-outside": (f"{EXTRACT} --data-root {{kp_outside}}", "lies outside the"),
    "extract-image-size-mismatch": (f"{EXTRACT} --data-root {{size_mismatch}}", "but"),
    "extract-unknown-category": (f"{EXTRACT} --data-root {{unknown_category}}", "missing category folder"),
    "extract-truncated-image": (f"{EXTRACT} --data-root {{truncated}} --t 50", "cannot read image"),
    "match-keypoint-outside": (f"match {FLUX} --data-root {{kp_outside}} --no-progress", "target keypoint 0"),
    "score-keypoint-outside": (f"score {FLUX} --data-root {{kp_outside}}", "lies outside the"),
    "score-box-inverted": (f"score {FLUX} --data-root {{box_inverted}}", "needs x1 < x2 and y1 < y2"),
    "score-box-negative": (f"score {FLUX} --data-root {{box_negative}}", "target box"),
    # score refuses what extract refuses, even with the predictions stored (same pair ids)
    "score-image-size-mismatch": (f"score {FLUX} --data-root {{size_mismatch}}", "use the benchmark's original images"),
    "score-unknown-category": (f"score {FLUX} --data-root {{unknown_category}}", "missing category folder"),
    "score-out-image-size-mismatch": (f"score {FLUX} --data-root {{size_mismatch}} --out {{base}}/t.csv",
                                      "use the benchmark's original images"),
    # match
    "match-channels-overwrite": (f"match {FLUX} --channels 999999 --overwrite --no-progress", "--channels 999999 is out of range"),
    "match-variant-typo": (f"match {FLUX} --variant adaln+dc --no-progress", "did you mean 'adaln+cd'?"),
    "match-protocol-typo": (f"match {FLUX} --protocol geoawre --no-progress", "unknown protocol 'geoawre' (did you mean 'geoaware'?)"),
    "match-device-tpu": (f"match {FLUX} --device tpu --no-progress", "unknown device 'tpu'"),
    "match-workers-zero": (f"match {FLUX} --workers 0 --no-progress", "--workers must be at least 1"),
    "match-model-typo": (f"match {FLUX} --model flx --no-progress", "unknown model 'flx'"),
    "match-variant-unsupported": (f"match {DINO} --variant adaln --no-progress", "tiny-dinov2 has no AdaLN"),
    "match-missing-key": (f"match {FLUX} --k 7 --no-progress", "has no key k7"),
    # score
    "score-variant-typo": (f"score {FLUX} --variant adaln+dc", "unknown variant 'adaln+dc' (did you mean 'adaln+cd'?)"),
    "score-model-typo": (f"score {FLUX} --model flx", "unknown model 'flx' (did you mean 'flux'?)"),
    "score-model-not-stored": (f"score {FLUX} --model tiny-sd3", "run `ditf extract --model tiny-sd3` first"),
    "score-variant-unsupported": (f"score {DINO} --variant adaln", "'raw' only"),
    "score-missing-key": (f"score {FLUX} --k 7 --t 260", "has no key k7 t260"),
    "score-protocol-typo": (f"score {FLUX} --protocol dfit", "did you mean 'dift'?"),
    "score-alpha-negative": (f"score {FLUX} --alpha -1", "0 < alpha <= 1"),
    "score-alpha-zero": (f"score {FLUX} --alpha 0", "0 < alpha <= 1"),
    "score-alpha-nan": (f"score {FLUX} --alpha nan", "got nan"),
    "score-alpha-above-one": (f"score {FLUX} --alpha 1.5", "0 < alpha <= 1"),
    "score-out-directory": (f"score {FLUX} --out {{base}}/out-dir", "is a directory"),
    "score-out-unwritable": (f"score {FLUX} --out /proc/no/such/table.txt", "not a writable folder"),
    "score-no-predictions": (f"score {FLUX} --t 90", "run `ditf match` first"),
    "score-two-keys": (f"score {FLUX} --k 1 --k 2", "one --k and one --t"),
    # ablate
    "ablate-variant-typo": (f"ablate {FLUX} --variant adaln+dc --no-progress", "did you mean 'adaln+cd'?"),
    "ablate-model-typo": (f"ablate {FLUX} --model flx --no-progress", "unknown model 'flx'"),
    "ablate-variant-unsupported": (f"ablate {DINO} --variant adaln-t --no-progress", "'raw' only"),
    "ablate-missing-key": (f"ablate {FLUX} --k 7 --no-progress", "has no key k7"),
    "ablate-aggregation": (f"ablate {FLUX} --aggregation per_pair --no-progress", "did you mean 'per_point'?"),
    "ablate-out-directory": (f"ablate {FLUX} --out {{base}}/out-dir --no-progress", "is a directory"),
    # compare
    "compare-model-typo": ("compare --data-root {root} --store {store} --row flx --no-progress", "unknown model 'flx'"),
    "compare-variant-typo": ("compare --data-root {root} --store {store} --row tiny-flux:adaln+dc --no-progress", "did you mean 'adaln+cd'?"),
    "compare-variant-unsupported": ("compare --data-root {root} --store {store} --row tiny-dinov2:adaln --no-progress", "'raw' only"),
    "compare-missing-key": ("compare --data-root {root} --store {store} --row tiny-flux/k7/t260 --no-progress", "has no key k7 t260"),
    "compare-alpha-nan": ("compare --data-root {root} --store {store} --alpha nan --no-progress", "got nan"),
    "compare-aggregation": ("compare --data-root {root} --store {store} --aggregation mean --no-progress", "unknown aggregation 'mean'"),
    "compare-out-directory": ("compare --data-root {root} --store {store} --out {base}/out-dir --no-progress", "is a directory"),
    # show
    "show-variant-typo": (f"show {FLUX} --pair 1 --variant adaln+dc --out {{base}}/x.png", "did you mean 'adaln+cd'?"),
    "show-model-typo": (f"show {FLUX} --pair 1 --model flx --out {{base}}/x.png", "unknown model 'flx'"),
    "show-variant-unsupported": (f"show {DINO} --pair 1 --variant adaln --out {{base}}/x.png", "'raw' only"),
    "show-missing-key": (f"show {FLUX} --pair 1 --k 7 --out {{base}}/x.png", "has no key k7"),
    "show-alpha": (f"show {FLUX} --pair 1 --alpha 2 --out {{base}}/x.png", "0 < alpha <= 1"),
    "show-out-not-figure": (f"show {FLUX} --pair 1 --out {{base}}/out-dir", "must be a .png, .pdf or .svg file"),
    # analyze
    "analyze-variant-typo": (f"analyze {FLUX} --variant adaln+dc --out {{base}}/an", "did you mean 'adaln+cd'?"),
    "analyze-model-typo": (f"analyze {FLUX} --model flx --out {{base}}/an", "unknown model 'flx'"),
    "analyze-missing-key": (f"analyze {FLUX} --k 7 --out {{base}}/an", "at k in [7]"),
    "analyze-out-is-file": (f"analyze {FLUX} --out {{base}}/a-file.txt", "is a file"),
    "analyze-alpha": (f"analyze {FLUX} --alpha 0 --out {{base}}/an", "0 < alpha <= 1"),
    # run: checks the match/score arguments before extracting
    "run-alpha-nan": (f"run {FLUX} --img-size 64 --ensemble-size 1 --alpha nan --no-progress", "got nan"),
    "run-variant-typo": (f"run {FLUX} --img-size 64 --ensemble-size 1 --variant raww --no-progress", "did you mean 'raw'?"),
}


def _assert_refused(world, returncode: int, stderr: str, output: str, expected: str, before) -> None:
    after = _snapshot(world.base)
    changed = sorted(name for name in before[0].keys() | after[0].keys() if before[0].get(name) != after[0].get(name))
    assert not changed and after[1] == before[1], f"a refused command changed files: {changed or after[1] ^ before[1]}"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert returncode == 1, output
    assert len(errors) == 1, stderr
    assert expected in errors[0], errors[0]
    assert "Traceback" not in output


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(world, case):
    spec, expected = CASES[case]
    before = _snapshot(world.base)
    result = _invoke(*_args(world, spec))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _assert_refused(world, result.exit_code, result.stderr, result.output, expected, before)


@pytest.mark.parametrize("case", [
    "score-variant-typo",  # torch-free: cheap enough for the edit loop
    pytest.param("extract-img-size-negative", marks=pytest.mark.slow),  # these two import torch + diffusers
    pytest.param("match-channels-overwrite", marks=pytest.mark.slow),
])
def test_bad_input_through_a_real_process(world, case):
    spec, expected = CASES[case]
    before = _snapshot(world.base)
    result = subprocess.run([sys.executable, "-m", "ditf_cli.main", *_args(world, spec)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _assert_refused(world, result.returncode, result.stderr, result.stdout + result.stderr, expected, before)


def test_the_store_still_answers_after_the_matrix(world):
    """The refusals above left a store every valid command still uses (default key picked)."""
    result = _ok("score", "--model", "tiny-flux", "--data-root", world.root, "--store", world.store, "--format", "json")
    [scored] = json.loads(result.stdout)
    assert scored["k"] == 2 and scored["t"] == 260


def test_help_of_every_command_exits_zero():
    names = [command.name or command.callback.__name__ for command in app.registered_commands]
    assert {"extract", "match", "score", "compare", "show", "analyze"} <= set(names)
    for args in ([], *([name] for name in names)):
        result = _invoke(*args, "--help")
        assert result.exit_code == 0, (args, result.output, result.exception)
        assert "Usage" in result.output


# ---- pieces -----------------------------------------------------------------------------------
class _Store:
    def __init__(self, keys):
        self.path = Path("s.zarr")
        self.keys = keys

    def feature_keys(self, dataset=None):
        return [("spair", model, k, t) for model, k, t in self.keys]


def test_select_key_prefers_the_model_default_then_the_only_key_then_lists():
    store = _Store([("tiny-flux", 1, 90), ("tiny-flux", 2, 260), ("tiny-flux", 2, 90), ("tiny-dinov2", 3, 0)])
    assert select_key(store, "spair", "tiny-flux") == (2, 260)  # tiny-flux's default key
    assert select_key(store, "spair", "tiny-flux", k=1) == (1, 90)  # the only one with k=1
    assert select_key(store, "spair", "tiny-dinov2") == (3, 0)  # the only key
    with pytest.raises(DitfError, match=r"several keys for spair/tiny-flux \(k2/t90, k1/t90\)|k1/t90, k2/t90"):
        select_key(store, "spair", "tiny-flux", t=90)
    with pytest.raises(DitfError, match=r"unknown model 'tiny-flx' \(did you mean 'tiny-flux'\?\)"):
        select_key(store, "spair", "tiny-flx")
    with pytest.raises(DitfError, match=r"no spair features of tiny-sd3 \(it has spair features of tiny-dinov2, tiny-flux\)"):
        select_key(store, "spair", "tiny-sd3")


def test_torch_free_name_lists_match_the_implementations():
    from ditf_pipeline.match.features import variant_names
    from ditf_pipeline.score.pck import PROTOCOL_RULES

    assert list(VARIANTS) == variant_names() and list(PROTOCOLS) == list(PROTOCOL_RULES)
    assert did_you_mean("adaln+dc", VARIANTS) == " (did you mean 'adaln+cd'?)"
    assert did_you_mean("zzz", VARIANTS) == ""


@pytest.mark.slow
def test_the_rerun_hint_printed_by_the_demo_works_when_pasted(tmp_path):
    """The demo adds grid keys (analyze/show views): the hint must still select the main key."""
    result = _ok("demo", "--out", tmp_path, "--no-progress")
    hint = next(line for line in result.stdout.splitlines() if "rerun any stage with" in line)
    args = shlex.split(hint.split("rerun any stage with", 1)[1])
    assert "several keys" not in _invoke("score", *args).output
    scored = _ok("score", *args, "--format", "json")
    assert [r["variant"] for r in json.loads(scored.stdout)] == ["adaln+cd"]
    _ok("ablate", *args, "--no-progress")
    _ok("show", *args, "--pair", "1", "--out", tmp_path / "hint.png")


def test_pair_geometry_and_annotated_sizes_are_checked_for_every_reader():
    """The shared checks the SPair, PF-Pascal and AP-10K readers call on every pair."""
    import numpy as np

    from ditf_pipeline.datasets.base import ImageRecord, Pair, check_annotated_sizes, check_pair_geometry

    def pair(trg_kps=((5.0, 5.0),), bbox=(1.0, 1.0, 30.0, 20.0)):
        return Pair("p", "cat", "cat/a", "cat/b", np.array([[1.0, 2.0]]), np.array(trg_kps), (40, 30), (40, 30), 29.0,
                    bbox, {"annotation": "p.json"})

    check_pair_geometry(pair())
    check_pair_geometry(pair(trg_kps=((40.0, 30.0),), bbox=(0.0, 0.0, 40.0, 30.0)))  # the far edge is inside
    for bad, message in [(pair(trg_kps=((41.0, 5.0),)), "target keypoint 0 (41, 5) lies outside the 40x30"),
                         (pair(trg_kps=((5.0, -1.0),)), "lies outside"),
                         (pair(bbox=(30.0, 1.0, 1.0, 20.0)), "needs x1 < x2 and y1 < y2"),
                         (pair(bbox=(1.0, 20.0, 30.0, 20.0)), "needs x1 < x2 and y1 < y2"),
                         (pair(bbox=(-2.0, 1.0, 30.0, 20.0)), "lies outside the 40x30 image"),
                         (pair(bbox=(1.0, 1.0, 30.0, 31.0)), "lies outside the 40x30 image")]:
        with pytest.raises(DitfError, match=r"^p\.json: .*" + message.replace("(", r"\(").replace(")", r"\)")):
            check_pair_geometry(bad)
    records = [ImageRecord("cat/a", Path("a.jpg")), ImageRecord("cat/b", Path("b.jpg"))]
    check_annotated_sizes([pair()], records, [(40, 30), (40, 30)])
    with pytest.raises(DitfError, match=r"image b\.jpg is 40x32 but p\.json says 40x30"):
        check_annotated_sizes([pair()], records, [(40, 30), (40, 32)])
