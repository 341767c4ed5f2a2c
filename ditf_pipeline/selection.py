"""Which stored key a command reads when the user gave --k/--t partly or not at all.

Orchestration, not input checking: the answer needs the model registry (each model's default
key, and its names for a did-you-mean), which imports torch, while `validate` stays torch-free
for the scorer.
"""

from __future__ import annotations

from .core.errors import DitfError, unknown


def _model_default(model: str) -> tuple[int, int] | None:
    """The model's default (k, t), or None for a name the registry does not know.

    The torch-free table first, so `ditf score` stays without torch; the registry (which imports
    torch) only for a model the table does not list.
    """
    from .core.naming import MODEL_DEFAULT_KEYS

    if model in MODEL_DEFAULT_KEYS:
        return MODEL_DEFAULT_KEYS[model]
    from .models import get_spec

    try:
        spec = get_spec(model)
    except DitfError:
        return None
    return spec.default_k, spec.default_t


def check_model_name(model: str) -> None:
    """Unknown model names (only called on the error path: the registry imports torch)."""
    from .models import model_names

    names = model_names()
    if model not in names:
        raise unknown("model", model, names)


def select_key(store, dataset: str, model: str, k: int | None = None, t: int | None = None) -> tuple[int, int]:
    """(k, t) of (dataset, model) in `store` when the user gave --k/--t partly or not at all.

    Among the stored keys that match what was given: the model's default key if stored, else
    the only one, else an error listing them. A model name the store does not hold is checked
    against the registry first, so a typo reads as a typo and not as "run extract first".
    """
    stored = sorted((kk, tt) for _, m, kk, tt in store.feature_keys(dataset) if m == model)
    if not stored:
        check_model_name(model)
        models = sorted({m for _, m, _, _ in store.feature_keys(dataset)})
        have = f"it has {dataset} features of {', '.join(models)}" if models else f"it has no {dataset} features"
        raise DitfError(f"store {store.path} has no {dataset} features of {model} ({have}): "
                        f"run `ditf extract --model {model}` first")
    matching = [(kk, tt) for kk, tt in stored if (k is None or kk == k) and (t is None or tt == t)]
    listing = ", ".join(f"k{kk}/t{tt}" for kk, tt in stored)
    if not matching:
        wanted = "".join([f" k{k}" if k is not None else "", f" t{t}" if t is not None else ""])
        raise DitfError(f"store {store.path} has no key{wanted} for {dataset}/{model} (it has {listing}): "
                        "pass one of those with --k/--t, or run `ditf extract` with them")
    if len(matching) == 1:
        return matching[0]
    default = _model_default(model)
    if default in matching:
        return default
    raise DitfError(f"store {store.path} holds several keys for {dataset}/{model} "
                    f"({', '.join(f'k{kk}/t{tt}' for kk, tt in matching)}): pick one with --k and --t")
