"""Reloading collapsed models exactly: :class:`AutoCollapsedModel`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import compat
from .architectures.base import adapter_for
from .surgery import RECORD_KEY, edit_op, validate_record

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
    wanted = [
        s.rfilename
        for s in siblings
        if s.rfilename.startswith(prefix)
        and s.rfilename[len(prefix) :].split("/")[0] == s.rfilename[len(prefix) :]
        and (s.rfilename.endswith(".safetensors") or s.rfilename.endswith(".json"))
    ]
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


def _weight_variant(name: str) -> tuple[str, str | None] | None:
    """``("diffusion_pytorch_model", "fp16")`` for ``diffusion_pytorch_model.fp16-00001-of-00002.safetensors``;
    ``None`` for a file that is not a weight file."""
    parts = name.split(".")
    if parts[-1] != "safetensors" or len(parts) not in (2, 3):
        return None
    prefix = parts[0].split("-")[0]
    variant = parts[1].split("-")[0] if len(parts) == 3 else None
    return (prefix, variant) if prefix in _WEIGHT_PREFIXES else None


def _load_state_dict(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    files = sorted(
        p for p in folder.glob("*.safetensors") if (found := _weight_variant(p.name)) and found[1] == variant
    )
    if not files:
        what = f"variant {variant!r} " if variant else ""
        raise FileNotFoundError(f"no safetensors weights {what}in {folder} (expected model.safetensors or shards)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """For each parameter/buffer object, every name it is reachable by (tied weights share one object)."""
    names: dict[int, set[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        names.setdefault(id(tensor), set()).add(name)
    return {name: group for group in names.values() for name in group}


def _replay(model: nn.Module, edits: list[dict[str, Any]]) -> None:
    for edit in edits:
        try:
            edit_op(edit["op"]).replay(model, edit)
        except (ValueError, KeyError, AttributeError) as error:
            raise ValueError(f"cannot replay the recorded edit {edit}: {error}") from error


def _check_family(model: nn.Module, record: dict[str, Any]) -> None:
    adapter = adapter_for(model)
    if record["family"] not in (adapter.family, *adapter.legacy_families):  # older records may use an earlier name
        validate_record(record, family=adapter.family)


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


#: Options of diffusers' ``ModelMixin.from_pretrained`` that the replaying loader honours (``low_cpu_mem_usage``
#: only changes how weights are loaded, not the result).
_DIFFUSERS_OPTIONS = (
    "dtype",
    "torch_dtype",
    "device_map",
    "max_memory",
    "variant",
    "use_safetensors",
    "low_cpu_mem_usage",
)
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating tensors of the state dict to ``dtype`` as diffusers' loader does: the modules a class keeps
    in float32 (``_keep_in_fp32_modules``) and the buffers not saved with the weights (positional tables built in
    ``__init__``) stay as built."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    keep = [keep] if isinstance(keep, str) else list(keep)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if any(m in name.split(".") for m in keep) else dtype)


def _place(model: nn.Module, device_map: Any, max_memory: Any) -> nn.Module:
    """Put ``model`` where ``device_map`` says: one device (``"cpu"``, ``"cuda:0"``, ``0``, a ``torch.device``,
    ``{"": device}``), an explicit per-module map, or an accelerate strategy (``"auto"``, ``"balanced"``, ...)."""
    if device_map is None:
        return model
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, (int, torch.device)) or (
        isinstance(device_map, str) and device_map not in _DEVICE_MAP_STRATEGIES
    ):
        return model.to(torch.device(device_map))
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = compat.no_split_modules(model)
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict):
        raise TypeError(f"device_map must be a device, a dict or one of {_DEVICE_MAP_STRATEGIES}, got {device_map!r}")
    if set(device_map.values()) <= {"cpu", torch.device("cpu")}:
        return model.to("cpu")
    return dispatch_model(model, device_map=device_map)


def _load_diffusers(
    cls: type, folder: Path, config_dict: dict[str, Any], record: dict[str, Any], **kwargs: Any
) -> nn.Module:
    unknown = sorted(set(kwargs) - set(_DIFFUSERS_OPTIONS))
    if unknown:
        raise TypeError(
            f"AutoCollapsedModel.from_pretrained of a collapsed diffusers model does not support "
            f"{unknown}; supported: {', '.join(_DIFFUSERS_OPTIONS)}, subfolder, revision, cache_dir, token"
        )
    if kwargs.get("use_safetensors") is False:
        raise ValueError(
            "hf_collapse saves and loads collapsed models as safetensors only: use_safetensors=False cannot be honoured"
        )
    requested = kwargs.get("dtype", None)
    requested = requested if requested is not None else kwargs.get("torch_dtype", None)
    if requested is not None and requested != "auto" and not isinstance(requested, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or 'auto', got {requested!r}")
    config_dict = {k: v for k, v in config_dict.items() if k != RECORD_KEY}
    config_dict.update(record["base_values"])
    model = cls.from_config(config_dict)
    _check_family(model, record)
    _replay(model, record["edits"])
    state = _load_state_dict(folder, kwargs.get("variant"))
    # Without a dtype (or with "auto"), the model takes the dtype of the saved weights, as transformers' "auto".
    dtype = (
        requested
        if isinstance(requested, torch.dtype)
        else next((t.dtype for t in state.values() if t.is_floating_point()), None)
    )
    if dtype is not None:
        _cast(model, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = _tied_names(model)
    untied = [name for name in missing if not (aliases.get(name, set()) - set(missing))]
    if unexpected or untied:
        raise ValueError(
            f"the weights in {folder} do not match the recorded structure: "
            f"missing {untied[:5]}, unexpected {unexpected[:5]}"
        )
    return _place(model, kwargs.get("device_map"), kwargs.get("max_memory"))


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
            kwargs: the loading options of the model's library. For transformers models, everything transformers'
                ``from_pretrained`` accepts (``dtype`` / ``torch_dtype``, ``device_map``, ``variant``, ...) is passed
                to it. For collapsed diffusers models, ``dtype`` / ``torch_dtype`` (default: the saved weights'
                dtype; modules the class keeps in float32 stay so, as in diffusers), ``device_map`` (a device, a
                per-module dict, or ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"``),
                ``max_memory``, ``variant``, ``use_safetensors`` and ``low_cpu_mem_usage`` are honoured and any
                other option is refused. A folder without an ``hf_collapse`` record loads with the plain
                ``from_pretrained`` of its library, with every option.

        Raises:
            ValueError: when the ``hf_collapse`` record is malformed, foreign, or does not match the weights.
            TypeError: for a loading option a collapsed diffusers model cannot honour.

        Example::

            >>> unet = hf_collapse.AutoCollapsedModel.from_pretrained("me/sd-collapsed", subfolder="unet",
            ...                                                       torch_dtype=torch.float16, device_map="cuda")
        """
        folder = _model_folder(pretrained_model_name_or_path, subfolder, revision, cache_dir, token)
        config_dict = json.loads((folder / "config.json").read_text())
        declared = (
            f"diffusers.{config_dict['_class_name']}"
            if "_class_name" in config_dict
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
            model = _load_diffusers(cls_, folder, config_dict, record, **kwargs)
        else:
            model = _load_transformers(cls_, folder, record, **kwargs)
        return model.eval()
