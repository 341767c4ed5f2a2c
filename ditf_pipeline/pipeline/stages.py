"""match and score for every kind of benchmark, chosen by the dataset's `task`.

* ``pairs`` (SPair-71k, PF-Pascal, AP-10K): keypoint predictions -> PCK (`predict`, `evaluate`);
* ``video`` (DAVIS-2017): label propagation into indexed PNGs -> J&F (`video`, `davis_metrics`);
* ``homography`` (HPatches): mutual NN + findHomography -> corner accuracy (`homography`).

Every path reads features from the store only. Scoring imports no torch: the torch-using
modules are imported inside the match functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from ..datasets.base import Dataset
from ..core.errors import DitfError
from ..core.settings import MatchSettings
from ..core.shards import Shard
from ..store.feature_store import FeatureStore, prediction_scope


@dataclass
class StageReport:
    key: str
    total: int
    done: int
    skipped: int
    channels: list[int]
    seconds: float
    unit: str = "pair(s)"

    def line(self) -> str:
        note = f", discarded channels {self.channels}" if self.channels else ""
        return f"match: {self.done} {self.unit} matched, {self.skipped} already done, {self.seconds:.1f} s{note} -> {self.key}"


def _features(store: FeatureStore, dataset: Dataset, model: str, k: int, t: int, settings: MatchSettings):
    """(arrays, rows, channels, key -> variant feature) for the non-pair drivers."""
    from ..match.features import USES_CHANNELS, variant_names
    from ..match.inputs import resolve_channels
    from ..match.predict import FeatureCache

    if settings.variant not in variant_names():
        from ..validate import unknown

        raise unknown("variant", settings.variant, variant_names())
    arrays = store.open_features(dataset.name, model, k, t)
    rows = store.image_rows(dataset.name)
    complete = arrays.complete()
    missing = [r.key for r in dataset.images() if r.key not in rows or not complete[rows[r.key]]]
    if missing:
        raise DitfError(f"{len(missing)} image(s) have no features in {arrays.path} (e.g. {missing[0]}): run `ditf extract` first")
    channels = resolve_channels(settings.channels, arrays) if settings.variant in USES_CHANNELS else []
    return arrays, channels, FeatureCache(arrays, rows, settings.variant, channels, size=16)


def match(store: FeatureStore, dataset: Dataset, model: str, k: int, t: int, settings: MatchSettings,
          overwrite: bool = False, progress: bool = True, client=None, executor=None) -> StageReport:
    """The match stage of any benchmark (pairs: spread over a dask `client` when given, or run by
    `executor`, a `match.executors` executor the caller made and closes)."""
    if dataset.task == "pairs":
        if client is not None:
            from ..distributed.runners import predict_distributed

            report = predict_distributed(client, store, dataset, model, k, t, settings,
                                         overwrite=overwrite, progress=progress)
        else:
            from ..match.predict import predict

            report = predict(store, dataset, model, k, t, settings, overwrite=overwrite, progress=progress,
                             executor=executor)
        return StageReport(report.key, report.n_pairs, report.matched, report.skipped, report.channels, report.seconds)
    settings.prediction_name(dataset.task)  # refuses --fuse here
    if settings.shard is not None and not Shard.parse(settings.shard).whole:
        raise DitfError(f"--shard applies to keypoint-pair benchmarks; {dataset.name} ({dataset.task}) is matched whole")
    if dataset.task == "video":
        return _match_video(store, dataset, model, k, t, settings, overwrite, progress)
    if dataset.task == "homography":
        return _match_homography(store, dataset, model, k, t, settings, overwrite, progress)
    raise DitfError(f"dataset {dataset.name} ({dataset.task}) has no match stage; see `ditf probe` for segmentation")


def _match_video(store, dataset, model, k, t, settings, overwrite, progress) -> StageReport:
    from ..core.progress import progress as progress_display
    from ..score.davis_metrics import RUN_MARKER
    from ..devices import resolve_device
    from ..match.video import PropagationSettings, propagate_davis

    start = time.perf_counter()
    arrays, channels, features = _features(store, dataset, model, k, t, settings)
    defaults = dataset.defaults
    propagation = PropagationSettings(
        temperature=defaults.get("temperature", 0.1), topk=defaults.get("topk", 5), n_last=defaults.get("n_last", 7),
        radius=defaults.get("radius", 12), upsample_factor=int(arrays.config.get("patch_stride", 16)),
    )
    out = store.results_dir((dataset.name, model, k, t), settings.prediction_name("video"))
    sequences = dataset.sequences()
    run_info = {"model": model, "k": k, "t": t, "variant": settings.variant, "channels": channels,
                "features": arrays.config, "sequences": [s.name for s in sequences]}
    marker = out / RUN_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if not overwrite and info.get("status") == "complete" and info.get("run") == json.loads(json.dumps(run_info)):
            return StageReport(str(out), len(sequences), 0, len(sequences), channels, time.perf_counter() - start, "sequence(s)")
        overwrite = True  # an incomplete or different earlier run is replaced, never reused
    bar = progress_display(len(sequences), f"propagate {settings.variant}", "seq", enabled=progress)
    propagate_davis(
        sequences, features, out, propagation, device=str(resolve_device(settings.device)), overwrite=overwrite,
        run_info=run_info,
        progress=lambda name, done, total: bar.update(1),
    )
    bar.close()
    return StageReport(str(out), len(sequences), len(sequences), 0, channels, time.perf_counter() - start, "sequence(s)")


def _match_homography(store, dataset, model, k, t, settings, overwrite, progress) -> StageReport:
    from ..core.progress import progress as progress_display
    from ..match.homography import match_pair
    from ..match.device import resolve_match_device

    start = time.perf_counter()
    device = str(resolve_match_device(settings.device))
    arrays, channels, features = _features(store, dataset, model, k, t, settings)
    pairs = dataset.homography_pairs()
    name = settings.prediction_name("homography")
    key = (dataset.name, model, k, t)
    ids = [f"{p.src_key}->{p.trg_key}" for p in pairs]
    attrs = {"variant": settings.variant, "channels": channels, "method": "lmeds", "features": arrays.config,
             "keypoints": dataset.keypoint_source}
    stored = store.open_predictions(key, name, ids, attrs=attrs, value_shape=(3, 3), block=64,
                                    scope=prediction_scope(dataset.split, ids), overwrite=overwrite)
    done = stored.done()
    todo = [i for i in range(len(pairs)) if not done[i]]
    blocks = sorted({i - i % 64 for i in todo})
    bar = progress_display(len(blocks), f"homography {settings.variant}", "block", enabled=progress)
    for block_start in blocks:
        block = []
        for pair in pairs[block_start : block_start + 64]:
            estimate = match_pair(
                features(pair.src_key), features(pair.trg_key), dataset.keypoints(pair.src_key),
                dataset.keypoints(pair.trg_key), pair.src_size, pair.trg_size, H_gt=pair.H, device=device,
            )
            block.append(estimate.H if estimate.H is not None else np.full((3, 3), np.nan))
        stored.write(block_start, block)
        bar.update(1)
    bar.close()
    return StageReport(stored.path, len(pairs), len(todo), len(pairs) - len(todo), channels,
                       time.perf_counter() - start, "image pair(s)")


def _rest(context: dict, result: dict) -> dict:
    return {key: value for key, value in context.items() if key not in result and key not in ("dataset", "split")}


def score(store: FeatureStore, dataset: Dataset, model: str, k: int, t: int, settings: MatchSettings,
          alphas=None) -> dict:
    """The score stage of any benchmark, as a JSON-ready dict (no torch)."""
    if dataset.task == "pairs":
        from ..score.evaluate import score_pairs

        return score_pairs(store, dataset, model, k, t, settings.prediction_name("pairs"), alphas)
    from ..score.evaluate import result_context

    name = settings.prediction_name(dataset.task)
    context = result_context(store, dataset, model, k, t, name)
    base = {key: context[key] for key in ("dataset", "split", "model", "k", "t")} | {"variant": settings.variant}
    if dataset.task == "video":
        from ..score.davis_metrics import RUN_MARKER, evaluate_results

        out = store.results_dir((dataset.name, model, k, t), name)
        marker = out / RUN_MARKER
        context["prediction_config"] = json.loads(marker.read_text()).get("run", {}) if marker.is_file() else {}
        result = evaluate_results(dataset.sequences(), out).to_dict()
        return {**base, "protocol": "davis2017 (J&F, first and last frames excluded, F tolerance 0.008 x diagonal)",
                "results_dir": str(out), **result, **_rest(context, result)}
    if dataset.task == "homography":
        from ..match.homography import corner_error, homography_accuracy

        pairs = dataset.homography_pairs()
        ids = [f"{p.src_key}->{p.trg_key}" for p in pairs]
        stored = store.open_predictions((dataset.name, model, k, t), settings.prediction_name("homography"),
                                        scope=prediction_scope(dataset.split, ids))
        context["prediction_config"] = stored.config
        values = stored.read_values()
        missing = [i for i in ids if i not in values]
        if missing:
            raise DitfError(f"no homography for {len(missing)} of {len(ids)} pairs (e.g. {missing[0]}): run `ditf match` first")
        errors = [corner_error(None if np.isnan(values[i]).any() else values[i].astype(np.float64), p.H, p.src_size)
                  for i, p in zip(ids, pairs)]
        return {**base, "protocol": "hpatches (mutual NN, LMEDS, mean corner error)", "n_pairs": len(pairs),
                "keypoints": stored.config.get("keypoints"), "unit": "percent",
                "threshold_rule": "correct if mean corner error <= threshold (pixels)",
                "accuracy": homography_accuracy(errors, [p.kind for p in pairs]), **_rest(context, base)}
    raise DitfError(f"dataset {dataset.name} ({dataset.task}) has no score stage here; see `ditf probe`")
