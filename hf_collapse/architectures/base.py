"""The adapter protocol: what hf_collapse needs to know about a model family, and the registry.

An adapter describes one family of models (BERT, Swin, a diffusers UNet, ...):

* its **blocks**: the residual units that can be collapsed, with their module paths, stage and index, and
  whether removing one keeps every tensor shape (only those are removable);
* the **tensors at each block's input and output** (``Block.input_path`` / ``Block.output_path``), for hooks;
* its **activation sites**: activation module, the linear/conv that produces its input and the one that
  consumes its output, and a preceding BatchNorm if any (used by TLC);
* how **removing blocks** changes the modules and the config.

Adding a family is one new module in this package that subclasses :class:`ArchitectureAdapter` and calls
:func:`register_architecture`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import compat

__all__ = [
    "ActivationSite",
    "ArchitectureAdapter",
    "Block",
    "adapter_for",
    "config_get",
    "config_set",
    "first_tensor",
    "register_architecture",
    "supported_families",
    "unregister_architecture",
    "is_causal_lm",
    "unwrap_model",
]


@dataclass(frozen=True)
class Block:
    """A removable unit of a model, as found by :func:`hf_collapse.find_blocks`.

    Attributes:
        name: the block's module path in the model that was inspected, the model the user passed (e.g.
            ``"bert.encoder.layer.3"`` for a ``BertForSequenceClassification``, ``"encoder.layer.3"`` for a
            ``BertModel``): ``model.get_submodule(block.name)``. Scores, reports and logs use it.
        path: the same path (kept for the code that reads ``.path``).
        stage: the stage the block belongs to (0 for single-stage models).
        index: the block's position inside its stage.
        params: number of parameters removed with the block.
        removable: whether removing the block keeps every tensor shape.
        reason: why the block is not removable, when it is not.
        input_path: module whose first input is the block's input (defaults to ``path``).
        output_path: module whose output is the block's output (defaults to ``path``).
        extra_paths: other modules removed together with the block (e.g. the UNet up-block resnet that
            consumes a down-block resnet's skip connection).
        local_name: the path relative to the family's backbone (``"encoder.layer.3"``), the same under any task
            head or wrapper: what saved records hold, and the spelling of hf_collapse before 0.1.
        aliases: every other spelling accepted for the block wherever a block is named: ``local_name`` and the path
            in the transformers / diffusers model inside a peft or DDP wrapper.
        kind: ``"block"`` for a whole residual block; ``"attention"`` or ``"mlp"`` for a sub-layer unit (from
            ``find_blocks(model, granularity=...)``), whose removal turns only that residual branch into ``x + 0``.
        output_adds_input: the unit's output is its input plus the output of ``output_path`` (a sub-layer's branch
            ends before the residual addition, which is no module): ``BlockIO`` adds them.

    Example::

        >>> block = hf_collapse.find_blocks(model)[3]          # a BertForSequenceClassification
        >>> block.name, block.local_name, block.removable
        ('bert.encoder.layer.3', 'encoder.layer.3', True)
        >>> layer = model.get_submodule(block.name)
        >>> smaller = hf_collapse.remove_blocks(model, ["encoder.layer.3"])   # the old spelling is accepted
    """

    name: str
    path: str
    stage: int
    index: int
    params: int
    removable: bool = True
    reason: str = ""
    input_path: str = ""
    output_path: str = ""
    extra_paths: tuple[str, ...] = ()
    local_name: str = ""
    aliases: tuple[str, ...] = ()
    kind: str = "block"
    output_adds_input: bool = False

    def __post_init__(self):
        if not self.input_path:
            object.__setattr__(self, "input_path", self.path)
        if not self.output_path:
            object.__setattr__(self, "output_path", self.path)
        if not self.local_name:
            object.__setattr__(self, "local_name", self.name)


@dataclass(frozen=True)
class ActivationSite:
    """A nonlinearity between two linear maps: what TLC measures, linearizes and fuses.

    Paths are relative to the family's backbone (``adapter.backbone(model)``: ``model.bert`` for a
    ``BertForSequenceClassification``), not to a task head or peft wrapper around it.

    Attributes:
        name: a short identifier (the activation's path).
        block: name of the block that contains the site ("" when no removable block contains it).
        activation: path of the activation module (for diffusers ``GELU`` this module also holds ``producer``).
        producer: path of the linear/conv whose output is the pre-activation.
        consumer: path of the linear/conv that reads the activation's output.
        norm: path of a BatchNorm between producer and activation, if any (its affine parameters give the
            pre-activation statistics without data).
        kind: ``"linear"``, ``"conv"`` or ``"conv1d"`` (GPT-2's transposed ``Conv1D``).
        gated: whether the activation gates another branch (GEGLU, SwiGLU): such sites cannot be linearized
            into a single linear map.

    Example::

        >>> site = hf_collapse.tlc.activation_sites(resnet)[0]     # a ResNetForImageClassification
        >>> site.kind, site.norm
        ('conv', 'encoder.stages.0.layers.0.layer.0.normalization')
        >>> producer = resnet.resnet.get_submodule(site.producer)  # paths are relative to the backbone
    """

    name: str
    block: str
    activation: str
    producer: str
    consumer: str
    norm: str | None = None
    kind: str = "linear"
    gated: bool = False


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a module's inputs or outputs (a tensor, a tuple/list, a dict or a ModelOutput).

    Returns ``None`` when there is none. A ``ModelOutput`` skips its ``None`` fields, so the first tensor of a
    forward pass given ``labels`` is the loss.

    Example::

        >>> from hf_collapse.architectures.base import first_tensor
        >>> first_tensor(model(**batch)).shape                  # BertModel: last_hidden_state
        torch.Size([32, 20, 384])
        >>> first_tensor((None, [hidden_states])) is hidden_states
        True
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # ModelOutput is an OrderedDict
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def config_get(model: nn.Module, key: str, default: Any = None) -> Any:
    """Read a config field of a transformers or diffusers model (``default`` when the field is missing).

    Example::

        >>> from hf_collapse.architectures.base import config_get
        >>> config_get(model, "num_hidden_layers")                  # all-MiniLM-L6-v2
        6
        >>> config_get(unet, "cross_attention_dim")                 # a diffusers FrozenDict config (SD 1.5)
        768
    """
    config = model.config
    if isinstance(config, dict):  # diffusers FrozenDict
        return config.get(key, default)
    return getattr(config, key, default)


def config_set(model: nn.Module, **values: Any) -> None:
    """Write config fields of a transformers or diffusers model (diffusers through ``register_to_config``).

    Only the config changes: the modules stay as they are.

    Example::

        >>> from hf_collapse.architectures.base import config_get, config_set
        >>> config_set(model, num_hidden_layers=5)
        >>> config_get(model, "num_hidden_layers")
        5
    """
    if isinstance(model.config, dict):
        model.register_to_config(**values)
    else:
        for key, value in values.items():
            setattr(model.config, key, value)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once); only trainable ones with ``trainable_only``.

    Example::

        >>> from transformers import AutoModel
        >>> from hf_collapse.data import embedded_model_path
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))   # all-MiniLM-L6-v2, a BertModel
        >>> from hf_collapse.metrics import count_parameters
        >>> count_parameters(model)                             # all-MiniLM-L6-v2
        22713216
        >>> trainable = count_parameters(peft_model, trainable_only=True)   # a peft model   # doctest: +SKIP
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (through any wrapper) is a transformers causal LM: its logits at position t predict the
    token at t + 1.

    Example::

        >>> from hf_collapse.architectures.base import is_causal_lm
        >>> is_causal_lm(llama_for_causal_lm), is_causal_lm(bert_for_sequence_classification)   # doctest: +SKIP
        (True, False)
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(unwrap_model(model)).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith("ForCausalLM")


def unwrap_model(model: nn.Module, keep_peft: bool = False) -> nn.Module:
    """Strip peft and DDP/accelerate wrappers, returning the transformers/diffusers model inside (the one unwrap
    helper of the package); with ``keep_peft``, strip only DDP / ``torch.compile`` and return the peft model.

    Also looks through ``torch.compile`` (``_orig_mod``); a model with no wrapper is returned as it is.

    Example::

        >>> from hf_collapse.architectures import unwrap_model
        >>> peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
        >>> unwrap_model(peft_model) is model                   # the BertForSequenceClassification inside
        True
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            if keep_peft:
                return model
            model = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif compat.compiled_original(model) is not None:  # torch.compile
            model = compat.compiled_original(model)
    return model


class ArchitectureAdapter:
    """Base class of the per-family adapters.

    Subclasses set ``family`` and ``model_types`` (transformers ``config.model_type`` values) or
    ``class_names`` (diffusers class names), and implement :meth:`blocks`, :meth:`remove` and
    :meth:`activation_sites`. All paths an adapter returns are relative to the *backbone*
    (``model.base_model`` for transformers task heads, the model itself for diffusers); the public API turns
    them into paths of the model the user passed. A new family subclasses this class and registers an instance
    (see :func:`register_architecture`).

    Example::

        >>> adapter = hf_collapse.adapter_for(model)            # a BertForSequenceClassification
        >>> adapter.family, adapter.backbone(model) is model.bert
        ('bert', True)
        >>> inputs = adapter.example_inputs(model, batch_size=2, seq_len=16)   # input_ids, attention_mask
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    description: str = ""
    legacy_families: tuple[str, ...] = ()  # earlier names of this family, as older records spell it

    # -- discovery ------------------------------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        """The module whose structure the adapter describes (the model without its task head)."""
        base = getattr(model, "base_model", None)
        return base if isinstance(base, nn.Module) else model

    def matches(self, model: nn.Module) -> bool:
        if type(model).__name__ in self.class_names:
            return True
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        return model_type is not None and model_type in self.model_types

    # -- what subclasses describe ----------------------------------------------------------------------
    def blocks(self, backbone: nn.Module) -> list[Block]:
        raise NotImplementedError

    def activation_sites(self, backbone: nn.Module) -> list[ActivationSite]:
        raise NotImplementedError

    #: Sub-layer granularities the family supports besides ``"block"`` (``("attention", "mlp")`` for decoders).
    sublayer_kinds: tuple[str, ...] = ()

    def sublayers(self, backbone: nn.Module, kind: str) -> list[Block]:
        """The sub-layer units of ``kind`` still present (``Block.kind == kind``), in forward order."""
        raise ValueError(f"family {self.family!r} has no sub-layer units")

    def remove_sublayers(self, backbone: nn.Module, units: list[Block]) -> None:
        """Replace the sub-layers ``units`` (from :meth:`sublayers`) by parameter-free zero modules, in place."""
        raise ValueError(f"family {self.family!r} has no sub-layer units")

    def remove(self, backbone: nn.Module, blocks: list[Block], base_values: dict[str, Any]) -> None:
        """Remove ``blocks`` from ``backbone`` in place and update its config.

        Before changing a config field for the first time, store its original value in ``base_values``
        (``base_values.setdefault(key, old)``): ``AutoCollapsedModel`` rebuilds the uncollapsed architecture
        from it and replays the recorded edits.
        """
        raise NotImplementedError

    def config_expresses(self, backbone: nn.Module, base_values: dict[str, Any], history: list[list[str]]) -> bool:
        """Whether plain ``from_pretrained`` of the updated config rebuilds the collapsed model exactly.

        ``base_values`` holds the original values of the config fields changed so far, ``history`` the block
        names of each ``remove_blocks`` call so far, in order.
        """
        return True

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seq_len: int = 128) -> dict[str, Any]:
        """Inputs of the right shapes for one forward pass (for FLOPs and latency measurements)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family!r}>"


_REGISTRY: list[ArchitectureAdapter] = []


def register_architecture(adapter: ArchitectureAdapter, *, override: bool = False) -> ArchitectureAdapter:
    """Register an adapter for a new model family (or replace one with ``override=True``).

    Example::

        class MyNetAdapter(hf_collapse.ArchitectureAdapter):
            family = "mynet"
            model_types = ("mynet",)
            def blocks(self, backbone): ...
            def remove(self, backbone, blocks, base_values): ...

        hf_collapse.register_architecture(MyNetAdapter())
    """
    if not isinstance(adapter, ArchitectureAdapter):
        raise TypeError(f"register_architecture expects an ArchitectureAdapter instance, got {type(adapter).__name__}")
    if not adapter.family:
        raise ValueError("an adapter needs a non-empty `family` name")
    if not (adapter.model_types or adapter.class_names) and type(adapter).matches is ArchitectureAdapter.matches:
        raise ValueError(
            f"adapter {adapter.family!r} matches nothing: set `model_types`, `class_names` or override `matches`"
        )
    existing = [a for a in _REGISTRY if a.family == adapter.family]
    if existing and not override:
        raise ValueError(f"family {adapter.family!r} is already registered; pass override=True to replace it")
    for old in existing:
        _REGISTRY.remove(old)
    # User adapters take precedence over the built-in ones.
    _REGISTRY.insert(0, adapter)
    return adapter


def unregister_architecture(family: str) -> None:
    """Remove a registered family (e.g. a user adapter registered for one script or test).

    Raises:
        ValueError: when no family of that name is registered.

    Example::

        >>> hf_collapse.register_architecture(MyNetAdapter())
        >>> hf_collapse.unregister_architecture("mynet")
        >>> "mynet" in hf_collapse.supported_families()
        False
    """
    before = len(_REGISTRY)
    _REGISTRY[:] = [a for a in _REGISTRY if a.family != family]
    if len(_REGISTRY) == before:
        raise ValueError(f"no family {family!r} is registered; registered: {', '.join(supported_families())}")


def supported_families() -> list[str]:
    """The ``family`` names of the registered adapters, the most recently registered first.

    Example::

        >>> sorted(hf_collapse.supported_families())
        ['bert', 'decoder', 'dit', 'gpt2', 'mobilenet_v2', 'resnet', 'swin', 'unet_2d_condition', 'vit']
    """
    return [a.family for a in _REGISTRY]


def _describe(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return type(model).__name__ + (f" (model_type={model_type!r})" if model_type else "")


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of ``model``'s family, looking through task heads, peft and DDP wrappers.

    Raises:
        ValueError: when no registered adapter knows the model; the message lists the supported families.

    Example::

        >>> adapter = hf_collapse.adapter_for(peft_model)       # a LoRA-wrapped BertForSequenceClassification
        >>> adapter.family
        'bert'
    """
    inner = unwrap_model(model)
    for adapter in _REGISTRY:
        if adapter.matches(adapter.backbone(inner)) or adapter.matches(inner):
            return adapter
    listed = sorted(
        f"{a.family} (formerly {', '.join(a.legacy_families)})" if a.legacy_families else a.family for a in _REGISTRY
    )
    raise ValueError(
        f"hf_collapse does not know the architecture of {_describe(inner)}. Supported families: "
        f"{', '.join(listed)}. Describe a new family with a subclass of "
        "hf_collapse.ArchitectureAdapter and hf_collapse.register_architecture(...)."
    )


def module_path(root: nn.Module, target: nn.Module) -> str:
    """The path of ``target`` inside ``root`` ("" for the root itself)."""
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def join_path(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else (prefix or path)


def replace_children(parent: nn.Module, attr: str, keep: Iterable[int]) -> None:
    """Rebuild the ModuleList / Sequential ``parent.<attr>`` with only the children at ``keep``."""
    container = getattr(parent, attr)
    kept = [container[i] for i in keep]
    setattr(parent, attr, type(container)(*kept) if isinstance(container, nn.Sequential) else nn.ModuleList(kept))
