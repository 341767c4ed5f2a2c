"""Every command scriptable: results alone on stdout, JSON that parses, -q everywhere, one key rule,
reporting commands that write nothing, `score` without torch and help text that is true."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ditf_cli.main import app
from ditf_pipeline.demo import make_spair_demo


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args):
    result = _invoke(*args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A tiny-flux store with the model's default key (k2/t260), a second key (k1/t90) and predictions."""
    base = tmp_path_factory.mktemp("scriptable")
    root = make_spair_demo(base / "SPair", categories=("cat",), pairs_per_category=2)
    store = base / "s.zarr"
    common = ["--model", "tiny-flux", "--data-root", root, "--store", store]
    tiny = ["--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32", "-q"]
    _ok("extract", *common, *tiny)
    _ok("extract", *common, *tiny, "--k", "1", "--t", "90")
    _ok("match", *common, "-q")
    return SimpleNamespace(base=base, root=root, store=store, common=common, tiny=tiny)


# ---- stdout carries the result only -------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["run", "--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32"],
    ["ablate"],
    ["score"],
    ["compare", "-r", "tiny-flux", "-r", "tiny-flux/k1/t90"],
    ["analyze", "--no-plots", "--sample", "2"],
])
def test_format_json_stdout_parses_with_progress_on(world, command, tmp_path):
    """Progress and notes stay on stderr even with --progress: `ditf X --format json > x.json` parses."""
    name, *rest = command
    args = [name, *(world.common if name != "compare" else world.common[2:]), *rest, "--format", "json"]
    if name == "analyze":
        args += ["--out", tmp_path / "analysis"]
    elif name not in ("score", "compare"):
        args += ["--progress"]
    result = _ok(*args)
    parsed = json.loads(result.stdout)
    assert parsed, result.stdout


def test_run_json_shape_equals_score_json_shape(world):
    """`run --format json` prints what `score --format json` prints for the same key and variant."""
    ran = json.loads(_ok("run", *world.common, "--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32",
                         "--k", "2", "--t", "260", "--format", "json", "-q").stdout)
    scored = json.loads(_ok("score", *world.common, "--k", "2", "--t", "260", "--format", "json").stdout)
    assert len(ran) == len(scored) == 1
    assert ran[0].keys() == scored[0].keys() and ran[0]["pck"] == scored[0]["pck"]


# each command's JSON: (arguments for one result, for several, what counts the results)
_SHAPES = {
    "score": (["-v", "adaln+cd"], ["-v", "adaln+cd", "-v", "raw"], len),
    "run": (["-v", "adaln+cd"], ["-v", "adaln+cd", "-v", "raw"], len),
    "ablate": (["-v", "raw"], ["-v", "raw", "-v", "adaln+cd"], len),
    "compare": (["-r", "tiny-flux"], ["-r", "tiny-flux", "-r", "tiny-flux/k1/t90"], len),
    "analyze": (["--k", "1", "--t", "90"], ["--k", "1", "--k", "2", "--t", "90", "--t", "260"], lambda parsed: len(parsed["keys"])),
}


@pytest.mark.parametrize("command", sorted(_SHAPES))
def test_format_json_shape_is_the_same_for_one_and_several_results(world, command, tmp_path):
    """A script reads `--format json` one way: the top-level type never depends on how many results."""
    one_args, several_args, count = _SHAPES[command]
    common = world.common if command != "compare" else world.common[2:]
    extra = {"run": [*world.tiny, "--k", "2", "--t", "260"], "ablate": ["-q"], "compare": ["-q"],
             "analyze": ["--no-plots", "--sample", "2"]}.get(command, [])
    if command in ("score", "compare"):  # predictions of both variants and keys, as ablate and run make their own
        _ok("match", *world.common, "-q", "-v", "adaln+cd", "-v", "raw")
        _ok("match", *world.common, "-q", "--k", "1", "--t", "90")
    parsed = []
    for n, args in enumerate((one_args, several_args)):
        out = ["--out", tmp_path / f"a{n}"] if command == "analyze" else []
        parsed.append(json.loads(_ok(command, *common, *extra, *args, *out, "--format", "json").stdout))
    one, several = parsed
    assert type(one) is type(several), (one, several)
    assert count(one) == 1 and count(several) == 2
    if isinstance(one, list):
        assert all(isinstance(result, dict) for result in [*one, *several])


def test_format_means_the_printed_result_format_on_every_command(tmp_path):
    """One meaning per option name: `--format` is what is printed (table, json, csv, markdown); a
    figure or export file type is refused there with the option that takes it, before any work."""
    import typer.main

    from ditf_pipeline.analysis.plots import FORMATS as PLOT_FORMATS
    from ditf_pipeline.match.export import FORMATS as EXPORT_FORMATS
    from ditf_pipeline.pipeline.report import FIGURE_FORMATS, FILE_FORMATS, FORMATS

    assert FIGURE_FORMATS == PLOT_FORMATS and FILE_FORMATS == EXPORT_FORMATS
    commands = typer.main.get_command(app).commands
    with_format = {name: param for name, command in commands.items() for param in command.params
                   if "--format" in param.opts}
    printed = {name for name, param in with_format.items() if not param.hidden}
    assert printed == {"score", "run", "ablate", "compare", "analyze", "probe"}
    assert set(with_format) - printed == {"show", "export"}  # kept only to point at the option meant
    for name, param in with_format.items():
        if name in printed:
            assert param.default in FORMATS and "|" in param.help, (name, param.help)
            named = set(param.help.replace("|", " ").replace(":", " ").split())
            assert not named & {*FIGURE_FORMATS, *FILE_FORMATS}, (name, param.help)
        required = ["--out", tmp_path / "out"] if name == "export" else []
        wrongs = [*FIGURE_FORMATS, *FILE_FORMATS, "pickle"] + (["json", "table"] if name not in printed else [])
        for wrong in wrongs:
            result = _invoke(name, *required, "--format", wrong)
            lines = result.output.strip().splitlines()
            assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (name, wrong, result.output)
            meant = {"show": "--figure-format", "export": "--file-format"}.get(name) or (
                "--figure-format" if wrong in FIGURE_FORMATS else "--file-format" if wrong in FILE_FORMATS else "choose one of")
            assert meant in lines[0], (name, wrong, lines)
    assert not (tmp_path / "out").exists()


def test_every_command_accepts_quiet():
    names = [command.name or command.callback.__name__ for command in app.registered_commands]
    assert {"extract", "match", "score", "run", "ablate", "compare", "analyze", "show", "export", "probe", "doctor",
            "demo", "models"} <= set(names)
    for name in names:
        for flag in ("-q", "--quiet"):
            result = _invoke(name, flag, "--help")
            assert result.exit_code == 0 and "No such option" not in result.output, (name, result.output)


def test_quiet_leaves_stderr_empty_and_stdout_the_result(world):
    result = _ok("ablate", *world.common, "-q", "--format", "json")
    assert result.stderr == "" and json.loads(result.stdout)


def test_run_takes_shard_and_jobs(world):
    """A whole shard (0/1) with one job is the same run: the cache answers, the scores print."""
    result = _ok("run", *world.common, "--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32", "--k", "2",
                 "--t", "260", "--shard", "0/1", "--jobs", "1", "--format", "json")
    assert [r["k"] for r in json.loads(result.stdout)] == [2]
    assert "0 image(s) extracted" in result.stderr


@pytest.mark.slow  # three `ditf run` processes, each importing torch and diffusers
def test_run_shards_extract_their_share_and_score_once_all_are_done(tmp_path):
    """Shard 0/2 meets the other shard's missing images, shard 1/2 the missing predictions: both
    print an empty JSON result and say why on stderr; a plain run then scores."""
    root = make_spair_demo(tmp_path / "SPair", categories=("cat",), pairs_per_category=2)
    args = ["run", "--model", "tiny-flux", "--data-root", str(root), "--store", str(tmp_path / "s.zarr"),
            "--img-size", "64", "--ensemble-size", "1", "--dtype", "fp32", "--no-progress", "--format", "json"]
    # one image row and one pair per block: each shard owns a part of both
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DITF_MATCH_BLOCK": "1", "DITF_ROWS_PER_SHARD": "1"}

    def ditf(*extra):
        result = subprocess.run([sys.executable, "-m", "ditf_cli.main", *args, *extra], capture_output=True,
                                text=True, env=env)
        assert result.returncode == 0, result.stderr
        return result

    for shard in ("0/2", "1/2"):
        result = ditf("--shard", shard, "--jobs", "1")
        assert json.loads(result.stdout) == [] and f"shard {shard} done" in result.stderr, result.stderr
    assert [r["k"] for r in json.loads(ditf().stdout)] == [2]


# ---- one key rule ---------------------------------------------------------------------------------
def test_export_and_open_store_pick_the_model_default_key_among_several(world, tmp_path):
    from ditf_pipeline import open_store

    _ok("export", "--model", "tiny-flux", "--store", world.store, "--out", tmp_path / "x", "--variant", "raw",
        "--file-format", "npy")
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "x").rglob("*.json")]
    assert sidecars and {(m["k"], m["t"]) for m in sidecars} == {(2, 260)}
    reader = open_store(world.store)
    image = sorted(reader.store.image_rows("spair"))[0]
    default = reader.features("spair", "tiny-flux", variant="raw", image=image)
    explicit = reader.features("spair", "tiny-flux", k=2, t=260, variant="raw", image=image)
    assert default.shape == explicit.shape and bool((default == explicit).all())


# ---- read-only by default -------------------------------------------------------------------------
def test_analyze_leaves_the_store_byte_identical_unless_write(world, tmp_path):
    before = _snapshot(world.store)
    _ok("analyze", *world.common, "--no-plots", "--sample", "2", "--ratio", "1.3", "--out", tmp_path / "a")
    assert _snapshot(world.store) == before
    import shutil

    copy = tmp_path / "copy.zarr"  # --write changes what --channels auto means: not in the shared store
    shutil.copytree(world.store, copy)
    _ok("analyze", *world.common[:4], "--store", copy, "--no-plots", "--sample", "2", "--ratio", "1.3",
        "--out", tmp_path / "b", "--write")
    assert _snapshot(copy) != before


# ---- score never imports torch --------------------------------------------------------------------
@pytest.mark.parametrize("key", [[], ["--k", "2", "--t", "260"]])
def test_score_runs_with_torch_unimportable(world, tmp_path, key):
    """torch is made unimportable (a meta-path finder that refuses it): score must still answer."""
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is not installed here')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from ditf_cli.main import main\n"
        "sys.argv = ['ditf', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = ["score", *map(str, world.common), *key, "--format", "json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert [r["k"] for r in json.loads(result.stdout)] == [2]


def test_torch_free_default_keys_equal_the_registry():
    from ditf_pipeline.core.naming import MODEL_DEFAULT_KEYS
    from ditf_pipeline.models import get_spec, model_names

    assert set(MODEL_DEFAULT_KEYS) == set(model_names())  # a new model adds its row here
    for name in MODEL_DEFAULT_KEYS:
        assert name in model_names(), name
        spec = get_spec(name)
        assert MODEL_DEFAULT_KEYS[name] == (spec.default_k, spec.default_t), name


# ---- help text that is true -----------------------------------------------------------------------
def test_help_text_is_true_per_command():
    for name in ("score", "show", "analyze", "export", "ablate", "compare"):
        text = _ok(name, "--help").output
        assert "created if missing" not in text, name
    for name in ("extract", "match", "run"):
        assert "created if missing" in _ok(name, "--help").output, name
    for name in ("extract", "match", "score", "run", "analyze", "doctor"):
        text = _ok(name, "--help").output
        assert "<bool>" not in text, name
    from ditf_pipeline.datasets import dataset_names

    text = " ".join(_ok("extract", "--help").output.split())
    assert "..." not in text.split("--dataset", 1)[1].split("--data-root", 1)[0]
    for dataset in dataset_names():
        assert dataset in text, dataset


# ---- compare labels rows that differ by key ----------------------------------------------------------
def test_compare_rows_of_one_variant_at_two_keys_are_labelled_with_the_key(world):
    table = _ok("compare", "--data-root", world.root, "--store", world.store, "-r", "tiny-flux",
                "-r", "tiny-flux/k1/t90", "--no-progress").stdout
    assert "k2/t260" in table and "k1/t90" in table


# ---- settings objects ---------------------------------------------------------------------------------
def test_settings_are_frozen_and_unknown_fields_refused():
    import dataclasses

    from ditf_pipeline.core.settings import FeatureSettings, MatchSettings, split_fields

    features = FeatureSettings(model="tiny-flux", k=[1, 2])
    assert features.k == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        features.k = (3,)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        MatchSettings().device = "cuda"  # type: ignore[misc]
    f, r, load = split_fields({"k": [3], "device": "cpu", "dtype": "fp32"}, features)
    assert (f.model, f.k, r.device, load.dtype) == ("tiny-flux", (3,), "cpu", "fp32") and features.k == (1, 2)
    with pytest.raises(TypeError, match="unknown setting"):
        split_fields({"ensemble": 2})


def test_extractor_leaves_its_callers_settings_as_passed(tmp_path):
    from ditf_pipeline.extract.extractor import Extractor, ExtractSettings
    from ditf_pipeline.models import load_adapter
    from ditf_pipeline.store.feature_store import FeatureStore

    adapter = load_adapter("tiny-dinov2", dtype="fp32", device="cpu")  # no noise, no prompt
    settings = ExtractSettings(ks=[3, 3], ts=[0], img_size=56, ensemble_size=4, prompt="template")
    before = dataclasses_copy(settings)
    extractor = Extractor(adapter, FeatureStore(tmp_path / "s.zarr"), settings)
    assert settings == before
    assert extractor.settings.ensemble_size == 1 and extractor.settings.prompt == "none" and extractor.settings.ks == [3]


def dataclasses_copy(value):
    import dataclasses

    return dataclasses.replace(value, ks=list(value.ks), ts=list(value.ts))


@pytest.mark.slow
def test_the_demo_hints_work_with_every_command_they_name(tmp_path):
    """Each hint line, pasted after the commands it names, runs (extract and run without a
    configuration refusal)."""
    import shlex

    result = _ok("demo", "--out", tmp_path, "--no-progress", "--no-views")
    lines = result.stdout.splitlines()
    reading = shlex.split(next(x for x in lines if "rerun any stage with" in x).split("rerun any stage with", 1)[1])
    writing = shlex.split(next(x for x in lines if "`ditf run` also take" in x).split("settings:", 1)[1])
    for command in ("score", "ablate", "match"):
        _ok(command, *reading, "-q")
    for command in ("extract", "run"):
        assert "0 image(s) extracted" in _ok(command, *writing).output, command


def test_run_functions_are_keyword_only_and_refuse_unknown_settings(tmp_path):
    from ditf_pipeline.pipeline import run_extract, run_match, run_score

    for fn in (run_extract, run_match, run_score):
        with pytest.raises(TypeError):
            fn("tiny-flux", "spair")
    with pytest.raises(TypeError, match="unknown setting"):
        run_extract(dataset="spair", data_root=tmp_path, store=tmp_path / "s.zarr", model="tiny-flux", ensemble=2)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("command", [["show", "--pair", "1"], ["export", "--out", "x"], ["analyze", "--no-plots"]])
def test_a_second_value_of_a_one_value_option_is_refused_not_dropped(world, command, tmp_path):
    """`--variant` repeats on every command; where a command draws one, a second is an error
    (click would otherwise keep the last one without a word)."""
    name, *rest = command
    args = [name, *(world.common if name != "export" else ["--model", "tiny-flux", "--store", world.store]), *rest,
            "-v", "raw", "-v", "adaln"]
    result = _invoke(*[str(tmp_path / a) if a == "x" else a for a in args])
    assert result.exit_code == 1 and "takes one --variant" in result.output, result.output
