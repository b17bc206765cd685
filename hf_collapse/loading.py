"""Reloading collapsed models exactly: :class:`AutoCollapsedModel`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .architectures.base import adapter_for
from .surgery import EDIT_OPS, RECORD_KEY, validate_record

__all__ = ["AutoCollapsedModel"]

_WEIGHT_PREFIXES = ("model", "diffusion_pytorch_model")


def _model_folder(name_or_path: str | os.PathLike, subfolder: str, revision: str | None, cache_dir, token) -> Path:
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = _download(str(name_or_path), subfolder, revision, cache_dir, token)
    folder = folder / subfolder if subfolder else folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a saved transformers / diffusers model folder")
    return folder


def _download(repo_id: str, subfolder: str, revision, cache_dir, token) -> Path:
    """Fetch the config and weights of a Hub repository (file by file, as transformers does) into the cache;
    returns the snapshot folder."""
    from huggingface_hub import HfApi, hf_hub_download

    prefix = f"{subfolder}/" if subfolder else ""
    siblings = HfApi(token=token).model_info(repo_id, revision=revision).siblings or []
    wanted = [s.rfilename for s in siblings if s.rfilename.startswith(prefix)
              and s.rfilename[len(prefix):].split("/")[0] == s.rfilename[len(prefix):]
              and (s.rfilename.endswith(".safetensors") or s.rfilename.endswith(".json"))]
    if f"{prefix}config.json" not in wanted:
        raise FileNotFoundError(f"no {prefix}config.json in the Hub repository {repo_id!r}")
    paths = [hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, token=token) for name in wanted]
    config = Path(paths[wanted.index(f"{prefix}config.json")])
    return config.parent.parent if subfolder else config.parent


def _import_class(qualified: str) -> type:
    library, _, name = qualified.partition(".")
    if library not in ("transformers", "diffusers") or not name.isidentifier():
        raise ValueError(
            f"model class {qualified!r} is not a transformers or diffusers class: hf_collapse only rebuilds those"
        )
    module = __import__(library)
    cls = getattr(module, name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"{qualified!r} is not a model class of the installed {library}")
    return cls


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(p for p in folder.glob("*.safetensors") if p.name.split(".")[0].split("-")[0] in _WEIGHT_PREFIXES)
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder} (expected model.safetensors or shards)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """For each parameter/buffer object, every name it is reachable by (tied weights share one object)."""
    names: dict[int, set[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), set()).add(name)
    return {name: group for group in names.values() for name in group}


def _replay(model: nn.Module, edits: list[dict[str, Any]]) -> None:
    for edit in edits:
        try:
            EDIT_OPS[edit["op"]].replay(model, edit)
        except (ValueError, KeyError, AttributeError) as error:
            raise ValueError(f"cannot replay the recorded edit {edit}: {error}") from error


def _check_family(model: nn.Module, record: dict[str, Any]) -> None:
    family = adapter_for(model).family
    if family != record["family"]:
        validate_record(record, family=family)


def _load_transformers(cls: type, folder: Path, record: dict[str, Any], **kwargs: Any) -> nn.Module:
    """Let transformers load the weights (key renaming, dtype, sharding, tied weights) into a model whose
    ``__init__`` builds the uncollapsed architecture and replays the recorded edits."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    delattr(config, RECORD_KEY)
    for key, value in record["base_values"].items():
        setattr(config, key, value)

    def __init__(self, config, *args, **init_kwargs):
        cls.__init__(self, config, *args, **init_kwargs)
        _check_family(self, record)
        _replay(self, record["edits"])

    replayed = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    model, info = replayed.from_pretrained(folder, config=config, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"the weights in {folder} do not match the recorded structure: {problems}")
    model.__class__ = cls  # the replay only changed construction; the result is a plain `cls` instance
    return model


def _load_diffusers(cls: type, folder: Path, config_dict: dict[str, Any], record: dict[str, Any]) -> nn.Module:
    config_dict = {k: v for k, v in config_dict.items() if k != RECORD_KEY}
    config_dict.update(record["base_values"])
    model = cls.from_config(config_dict)
    _check_family(model, record)
    _replay(model, record["edits"])
    state = _load_state_dict(folder)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if dtype is not None and dtype != model.dtype:
        model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = _tied_names(model)
    untied = [name for name in missing if not (aliases.get(name, set()) - set(missing))]
    if unexpected or untied:
        raise ValueError(
            f"the weights in {folder} do not match the recorded structure: "
            f"missing {untied[:5]}, unexpected {unexpected[:5]}"
        )
    return model


class AutoCollapsedModel:
    """Loads any model saved by hf_collapse, re-applying the structural edits its config records.

    Plain ``from_pretrained`` of transformers / diffusers already rebuilds a collapsed model whenever the config
    can express the change (layer counts, per-stage depths); ``AutoCollapsedModel`` always does, including
    removals the config cannot describe (MobileNetV2 blocks, a Swin block whose removal changes the shifted
    window pattern). A folder without an ``hf_collapse`` record loads as plain ``from_pretrained`` would.

    Example::

        >>> model = hf_collapse.AutoCollapsedModel.from_pretrained("path/or/repo-id")
    """

    def __init__(self):
        raise TypeError("use AutoCollapsedModel.from_pretrained(path_or_repo_id)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str = "",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        """Load a model folder or Hub repository saved with ``save_pretrained`` (collapsed or not).

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repository id.
            subfolder: the model's folder inside it (``"unet"`` in a diffusers pipeline).
            revision, cache_dir, token: passed to ``huggingface_hub`` when downloading.
            kwargs: passed to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ...) and, for a
                folder without an ``hf_collapse`` record, to the plain ``from_pretrained`` of its library.

        Raises:
            ValueError: when the ``hf_collapse`` record is malformed, foreign, or does not match the weights.
        """
        folder = _model_folder(pretrained_model_name_or_path, subfolder, revision, cache_dir, token)
        config_dict = json.loads((folder / "config.json").read_text())
        declared = (
            f"diffusers.{config_dict['_class_name']}" if "_class_name" in config_dict
            else f"transformers.{(config_dict.get('architectures') or ['AutoModel'])[0]}"
        )
        record = config_dict.get(RECORD_KEY)
        if record is None:
            return _import_class(declared).from_pretrained(folder, **kwargs)

        record = validate_record(record)
        if record["model_class"] != declared:
            raise ValueError(
                f"the '{RECORD_KEY}' record was written for {record['model_class']}, but the config declares "
                f"{declared}: the record is foreign to this model"
            )
        cls_ = _import_class(declared)
        if declared.startswith("diffusers."):
            model = _load_diffusers(cls_, folder, config_dict, record)
        else:
            model = _load_transformers(cls_, folder, record, **kwargs)
        return model.eval()
