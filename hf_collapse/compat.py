"""The one place where hf_collapse touches private APIs of peft, torch, transformers and accelerate.

Each function below wraps one assumption about another library's internals: an enum's private tables, a hook
peft calls on its tuners, a private attribute of a tensor, the call structure of ``transformers.Trainer``.
``tests/test_compat.py`` tests every assumption against the installed versions, so that an upgrade that breaks
one fails loudly there, naming it, instead of silently somewhere in a training run.

Rules for this module:

* one section per library, one function (or constant) per assumption, each with a docstring saying what it
  assumes and the versions it was checked with, and a test in ``tests/test_compat.py``;
* nothing here runs on import: importing :mod:`hf_collapse.compat` imports none of those libraries (each
  function imports what it needs), so ``import hf_collapse`` stays free of side effects;
* a broken assumption raises :class:`CompatibilityError` with the library, what changed and what to do.

Checked with: peft 0.21, torch 2.13, transformers 5.24, accelerate 1.15.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any

__all__ = [
    "CompatibilityError",
    # peft
    "PEFT_TUNER_HOOKS",
    "extend_peft_type",
    "init_tuner_layer_state",
    "is_excluded_target",
    "peft_method_registered",
    "register_peft_method",
    # torch
    "compiled_original",
    "conv2d_forward",
    "module_tables",
    "profiler_events",
    "register_optimizer_step_post_hook",
    "resize_parameter_",
    "strip_fsdp_prefix",
    "tensor_version",
    # accelerate
    "forget_accelerate_preparation",
    "unwrap_optimizer",
    # Python
    "parser_actions",
    "parser_option_strings",
    # transformers
    "no_split_modules",
    "saved_callback_state",
    "trainer_task_loss_multiplier",
]


class CompatibilityError(RuntimeError):
    """An installed library no longer matches what hf_collapse assumes about its internals."""


def _broken(library: str, what: str) -> CompatibilityError:
    return CompatibilityError(
        f"hf_collapse does not support the installed {library}: {what}. Please report this "
        "(with the library's version), or install the version hf_collapse was tested with."
    )


# =============================================================================================================
# peft
# =============================================================================================================

#: The private hooks of ``peft.tuners.tuners_utils.BaseTuner`` that TraDy's tuner overrides, with the parameter
#: names peft calls them with. peft calls them by name, so a rename would silently bypass TraDy's code.
PEFT_TUNER_HOOKS: dict[str, tuple[str, ...]] = {
    "_pre_injection_hook": ("self", "model", "config", "adapter_name"),
    "_post_injection_hook": ("self", "model", "config", "adapter_name"),
    "_prepare_adapter_config": ("self", "peft_config", "model_config"),
    "_create_and_replace": ("self", "peft_config", "adapter_name", "target", "target_name", "parent", "current_key"),
    "_replace_module": ("self", "parent", "child_name", "new_module", "child"),
    "_get_adapter_state_dict": ("model", "config", "adapter_name", "state_dict", "unwanted_adapter_names"),
    "_remap_adapter_state_dict_for_load": ("model", "config", "adapter_name", "state_dict"),
}


def extend_peft_type(name: str) -> enum.Enum:
    """Add ``name`` to peft's closed ``PeftType`` enum (a ``str`` Enum) and return the member (idempotent).

    Assumes: ``peft.utils.peft_types.PeftType`` is a ``str`` Enum whose members live in Python's private enum
    tables ``_member_map_``, ``_value2member_map_`` and ``_member_names_``. peft's ``register_peft_method`` refuses
    names outside ``PeftType``, and enums cannot be extended through a public API, so this is the one place that
    touches enum internals.

    Raises:
        CompatibilityError: when ``PeftType`` or Python's enum internals are not what this code expects.
    """
    from peft.utils import peft_types

    peft_type = getattr(peft_types, "PeftType", None)
    if not (isinstance(peft_type, enum.EnumMeta) and issubclass(peft_type, str)):
        raise _broken("peft", f"peft.utils.peft_types.PeftType is {peft_type!r}, not a str Enum as in peft 0.17-0.21")
    if name in peft_type.__members__:
        return peft_type[name]
    for attribute in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(peft_type, attribute):
            raise _broken("Python", f"enums have no {attribute} (Python's enum internals changed)")
    member = str.__new__(peft_type, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = peft_type
    member.__init__(name)
    peft_type._member_map_[name] = member
    peft_type._value2member_map_[name] = member
    peft_type._member_names_.append(name)
    type.__setattr__(peft_type, name, member)
    if peft_type(name) is not member or peft_type[name] is not member or member not in list(peft_type):
        raise _broken("peft", "extending the PeftType enum did not take effect")
    return member


def peft_method_registered(name: str, model_cls: type) -> bool:
    """Whether peft's registry maps the method ``name`` (upper case, e.g. ``"TRADY"``) to ``model_cls``.

    Assumes: ``peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING`` is the dict ``register_peft_method`` fills. Reads
    ``PeftType`` without extending it: a name peft does not know is simply not registered.
    """
    from peft import mapping
    from peft.utils import peft_types

    members = peft_types.PeftType.__members__
    return name in members and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(members[name]) is model_cls


def register_peft_method(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make ``name`` (upper case) a peft method like LoRA: extend ``PeftType``, then call peft's own
    ``register_peft_method``. Idempotent.

    Assumes: ``peft.utils.peft_types.register_peft_method`` (peft >= 0.15) fills ``PEFT_TYPE_TO_CONFIG_MAPPING``
    (keyed by the name) and ``PEFT_TYPE_TO_TUNER_MAPPING`` (keyed by the member).

    Raises:
        CompatibilityError: when peft's registry is not what this code was written for.
    """
    from peft import mapping
    from peft.utils import peft_types

    register = getattr(peft_types, "register_peft_method", None)
    if register is None:
        raise _broken("peft", "peft.utils.peft_types.register_peft_method is missing (peft >= 0.15 has it)")
    member = extend_peft_type(name)
    if mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(member) is model_cls:
        return
    register(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    if mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(name) is not config_cls:
        raise _broken("peft", f"register_peft_method did not register {name}")


def is_excluded_target(match: Any) -> bool:
    """Whether a ``check_target_module_exists`` result means "excluded by ``exclude_modules``".

    Assumes: peft returns an instance of its private ``_ExcludedModule`` (falsy) for an excluded module.
    """
    return type(match).__name__ == "_ExcludedModule"


def init_tuner_layer_state(layer: Any, adapter_name: str) -> None:
    """Set the private state every peft tuner layer initialises itself (as LoRA's layers do).

    Assumes: ``BaseTunerLayer.disable_adapters``, ``.merged`` and ``.active_adapters`` read ``_disable_adapters``,
    ``merged_adapters`` and ``_active_adapter``.
    """
    layer._disable_adapters = False
    layer.merged_adapters = []
    layer._active_adapter = adapter_name


# =============================================================================================================
# torch
# =============================================================================================================


def tensor_version(tensor: Any) -> int:
    """The version counter of ``tensor``: it grows with every in-place change (an optimizer step included).

    Assumes: ``Tensor._version`` (private, stable since torch 1.x).
    """
    return int(tensor._version)


def conv2d_forward(module: Any, x: Any, weight: Any, bias: Any) -> Any:
    """``module``'s convolution with another weight, honouring its padding mode, stride, dilation and groups.

    Assumes: ``torch.nn.Conv2d._conv_forward(input, weight, bias)``.
    """
    return module._conv_forward(x, weight, bias)


def compiled_original(model: Any) -> Any:
    """The module ``torch.compile`` wrapped, or ``None`` when ``model`` is not a compiled module.

    Assumes: ``torch.compile`` returns an ``OptimizedModule`` holding the original as ``_orig_mod``.
    """
    return getattr(model, "_orig_mod", None)


def module_tables(module: Any) -> tuple[dict, dict, dict]:
    """The dicts in which ``module`` keeps its children, parameters and buffers (live: changing them changes it).

    Assumes: ``torch.nn.Module`` stores them in ``_modules``, ``_parameters`` and ``_buffers``, which ``setattr`` and
    ``register_*`` fill (stable since torch 1.0).
    """
    return module._modules, module._parameters, module._buffers


def profiler_events(profile: Any) -> list:
    """The raw events a finished ``torch.profiler.profile`` recorded (each with ``name()``, ``start_ns()``,
    ``duration_ns()``, ``nbytes()`` and ``device_type()``), allocation events (``"[memory]"``) included.

    Assumes: ``profile.profiler.kineto_results.events()`` (the public ``key_averages`` drops allocation events).
    """
    results = getattr(getattr(profile, "profiler", None), "kineto_results", None)
    if results is None:
        raise _broken("torch", "torch.profiler.profile has no profiler.kineto_results")
    return list(results.events())


def register_optimizer_step_post_hook(hook: Any) -> Any:
    """A hook run after every ``optimizer.step()`` of every torch optimizer; returns the removable handle.

    Assumes: ``torch.optim.optimizer.register_optimizer_step_post_hook`` (torch >= 2.0; not re-exported by
    ``torch.optim``).
    """
    from torch.optim import optimizer as optimizer_module

    register = getattr(optimizer_module, "register_optimizer_step_post_hook", None)
    if register is None:
        raise _broken("torch", "torch.optim.optimizer.register_optimizer_step_post_hook is missing")
    return register(hook)


def resize_parameter_(parameter: Any, numel: int) -> None:
    """Give ``parameter`` ``numel`` zeros, in place: the Parameter object stays the same, so an optimizer (or a
    module) holding it sees the new size. Its gradient is dropped when the size changes.

    Autograd forgets the old shape too: a graph built before the resize (a user's ``{k: v.clone() ...}`` snapshot, a
    forward before calibration) made autograd record the parameter's shape in its gradient accumulator, and the
    next backward would check the new gradients against that shape ("invalid gradient ... expected shape compatible
    with [0]"). The accumulator is dropped, so the next graph records the new shape; graphs built before keep theirs.

    Assumes: assigning ``parameter.data`` a tensor of another shape is allowed; autograd drops a leaf's gradient
    accumulator when ``.data`` is given a tensor of another dtype (``VariableHooks::set_data``), and nothing else
    does (the accumulator is internal); an optimizer with no state for the parameter initialises that state from
    its current shape at the next step.
    """
    import torch

    with torch.no_grad():
        if parameter.numel() == numel:
            parameter.zero_()
            return
        dtype = parameter.dtype
        other = torch.float64 if dtype != torch.float64 else torch.float32
        parameter.data = torch.zeros(0, dtype=other, device=parameter.device)  # drops the gradient accumulator
        parameter.data = torch.zeros(numel, dtype=dtype, device=parameter.device)
        parameter.grad = None


def strip_fsdp_prefix(name: str) -> str:
    """A module name without the ``_fsdp_wrapped_module.`` that FSDP1's wrapper puts in front of it.

    Assumes: ``torch.distributed.fsdp.FullyShardedDataParallel`` keeps the wrapped module as ``_fsdp_wrapped_module``.
    """
    return name.replace("_fsdp_wrapped_module.", "")


# =============================================================================================================
# accelerate
# =============================================================================================================


def unwrap_optimizer(optimizer: Any) -> Iterator[Any]:
    """``optimizer`` and every optimizer it wraps, outermost first.

    Assumes: accelerate's ``AcceleratedOptimizer`` (and transformers' wrappers) keep the wrapped optimizer in
    ``.optimizer``.
    """
    seen = set()
    current = optimizer
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "optimizer", None)


def forget_accelerate_preparation(model: Any) -> None:
    """Unmark ``model`` as prepared by an ``Accelerator``.

    Assumes: accelerate marks a model it prepared with the instance attribute ``_is_accelerate_prepared`` and never
    wraps a marked model (or a deep copy of it) again: a later fine-tuning Trainer would then train without DDP.
    """
    vars(model).pop("_is_accelerate_prepared", None)


# =============================================================================================================
# Python's standard library
# =============================================================================================================


def parser_actions(parser: Any) -> list[Any]:
    """The actions (one per flag) of an ``argparse`` parser.

    Assumes: ``argparse.ArgumentParser`` keeps its actions in ``_actions`` (unchanged since Python 3.2).
    """
    return list(parser._actions)


def parser_option_strings(parser: Any) -> list[str]:
    """Every option string (``--flag``) an ``argparse`` parser accepts, for suggesting the closest to a typo."""
    return [option for action in parser_actions(parser) for option in action.option_strings]


# =============================================================================================================
# transformers
# =============================================================================================================


def set_activation_checkpointing(model: Any, on: bool) -> None:
    """Turn a transformers model's activation (gradient) checkpointing on, non-reentrant, or off, without making the
    input embeddings' output require gradients.

    Enabling checkpointing on a text model also hooks the input embeddings so that their output requires gradients
    (what reentrant checkpointing and LoRA under the Trainer need), and disabling it leaves that hook in place. With
    non-reentrant checkpointing nothing needs it, and it would carry the backward pass down to the embeddings through
    every layer, which a method that trains only the last layers (TraDy's depth) must not pay for: it is removed.

    Assumes: ``activation_checkpointing_enable(activation_checkpointing_kwargs=...)`` /
    ``activation_checkpointing_disable()`` (transformers >= 5; before, the ``gradient_checkpointing_*`` names) and
    ``disable_input_require_grads()`` removing the hook, a no-op without one.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    disable = getattr(model, "activation_checkpointing_disable", None)
    if on:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # pragma: no cover - transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif disable is not None:
        disable()
    else:  # pragma: no cover - transformers < 5
        model.gradient_checkpointing_disable()
    drop = getattr(model, "disable_input_require_grads", None)
    if drop is not None:
        drop()


def no_split_modules(model: Any) -> list[str]:
    """The module classes ``model`` declares must stay whole on one device (for accelerate's device maps).

    Assumes: transformers models declare them in the class attribute ``_no_split_modules`` (what ``device_map="auto"``
    of ``from_pretrained`` reads).
    """
    return list(getattr(model, "_no_split_modules", None) or [])


def trainer_task_loss_multiplier(trainer: Any, num_items_in_batch: Any) -> int:
    """The factor by which ``Trainer.compute_loss`` multiplies the model's loss (transformers 5): the number of
    processes over the tensor-parallel size when it passes ``num_items_in_batch`` and averages tokens across devices,
    ``n_gpu`` under ``nn.DataParallel``; else 1. LaCoOT scales its penalty by the same rule."""
    args = trainer.args
    if (
        args.average_tokens_across_devices
        and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func)
        and num_items_in_batch is not None
    ):
        return trainer.accelerator.num_processes // trainer.get_tp_size() if args.n_gpu <= 1 else args.n_gpu
    return 1


def saved_callback_state(trainer_state: Any, callback_name: str) -> dict | None:
    """The ``attributes`` a checkpoint saved for the (first) callback of class ``callback_name``, or ``None``.

    Assumes: ``TrainerState.stateful_callbacks`` maps a callback's class name to ``callback.state()`` (a dict with
    ``"args"`` and ``"attributes"``), or to a list of them when several callbacks share the class, and a resumed
    run's ``TrainerState`` is loaded from the checkpoint before training begins.
    """
    saved = (getattr(trainer_state, "stateful_callbacks", None) or {}).get(callback_name)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    if saved is None:
        return None
    if not isinstance(saved, dict) or "attributes" not in saved:
        raise _broken(
            "transformers",
            f"TrainerState.stateful_callbacks[{callback_name!r}] is {type(saved).__name__}, "
            "not the {'args', 'attributes'} dict of ExportableState.state()",
        )
    return saved["attributes"]
