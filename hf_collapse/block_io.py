"""Capture each block's input and output during a forward pass, as per-sample feature matrices.

Used by the LaCoOT penalty (with gradients) and by the block scorers (without). Hooks go on the unwrapped
model (through DDP / peft wrappers), on the modules the adapter names as each block's input and output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .architectures.base import Block, first_tensor, is_causal_lm
from .names import resolve_names
from .surgery import block_aliases, find_blocks

__all__ = ["BlockIO", "DATA_PARALLEL_MESSAGE", "feature_mask", "select_blocks"]

DATA_PARALLEL_MESSAGE = (
    "torch.nn.DataParallel runs replicas of the model in threads that share hf_collapse's forward hooks, so the block "
    "features they record overwrite one another. Run one process per device instead: `torchrun --nproc_per_node N "
    "script.py` or `accelerate launch` (the Trainer then uses DistributedDataParallel, which hf_collapse supports)."
)


def select_blocks(model: nn.Module, names: str | Sequence[str] = "auto", granularity: str = "block") -> list[Block]:
    """The blocks named by ``names``: ``"auto"`` for every removable block, or a list of block names.

    ``granularity`` (``"block"``, ``"attention"``, ``"mlp"``) picks the units, as in :func:`hf_collapse.find_blocks`.

    Named blocks are returned in the order given, as they are (removable or not).

    Raises:
        ValueError: for an unknown or repeated name (a block's ``name`` or one of its ``aliases``), or an empty list.

    Example::

        >>> from transformers import AutoModelForSequenceClassification
        >>> from hf_collapse.block_io import select_blocks
        >>> from hf_collapse.data import embedded_model_path
        >>> model = AutoModelForSequenceClassification.from_pretrained(embedded_model_path("minilm"))
        >>> [b.name for b in select_blocks(model)][:2]                        # a BertForSequenceClassification
        ['bert.encoder.layer.0', 'bert.encoder.layer.1']
        >>> [b.name for b in select_blocks(model, ["encoder.layer.4"])]      # the backbone-relative spelling
        ['bert.encoder.layer.4']
    """
    blocks = find_blocks(model, granularity)
    if names == "auto":
        return [b for b in blocks if b.removable]
    if isinstance(names, str):
        names = [names]
    return resolve_names(names, {b.name: b for b in blocks}, "block", aliases=block_aliases(blocks))


class BlockIO:
    """Forward hooks that keep the latest input and output of each block while :meth:`capturing` is active.

    Hooks fire only inside ``with block_io.capturing():``, so a gradient-checkpointing recompute during the
    backward pass (outside that context) records nothing and nothing is counted twice.

    Example::

        io = BlockIO(model, hf_collapse.find_blocks(model))
        with io.capturing(attention_mask=batch["attention_mask"]):
            model(**batch)
        x, y = io.features("bert.encoder.layer.0")  # (batch, tokens * hidden) each, padding zeroed
        io.remove()
    """

    def __init__(self, model: nn.Module, blocks: Sequence[Block], detach: bool = False):
        self.blocks = list(blocks)
        self.detach = detach
        self._active = False
        self._mask: torch.Tensor | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._without_grad: set[str] = set()
        self._grad_at_start = False
        self._adds_input = {block.name: block.output_adds_input for block in self.blocks}
        # Paths from find_blocks(model) are valid in `model` itself; DDP / peft wrappers share the module objects.
        root = model
        if isinstance(root, nn.DataParallel):
            raise ValueError(DATA_PARALLEL_MESSAGE)
        self._handles = []
        self._output_modules: dict[str, nn.Module] = {}
        for block in self.blocks:
            self._handles.append(
                root.get_submodule(block.input_path).register_forward_pre_hook(
                    self._input_hook(block.name, root.get_submodule(block.input_path)), with_kwargs=True
                )
            )
            output_module = root.get_submodule(block.output_path)
            self._output_modules[block.name] = output_module
            self._handles.append(output_module.register_forward_hook(self._output_hook(block.name, output_module)))

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if self.detach else tensor

    def _input_hook(self, name: str, registered: nn.Module):
        def hook(module, args, kwargs):
            if self._active:
                if module is not registered:  # a replica made by nn.DataParallel shares the original's hooks (a deep
                    raise RuntimeError(DATA_PARALLEL_MESSAGE)  # copy too, but copies run outside capturing())
                tensor = first_tensor(args) if args else first_tensor(kwargs.get("hidden_states", kwargs))
                if tensor is not None:
                    self._inputs[name] = self._keep(tensor)

        return hook

    def _output_hook(self, name: str, registered: nn.Module):
        def hook(module, args, output):
            if self._active:
                if module is not registered:
                    raise RuntimeError(DATA_PARALLEL_MESSAGE)
                tensor = first_tensor(output)
                if tensor is not None:
                    self._outputs[name] = self._keep(tensor)
                    if self._grad_at_start and not torch.is_grad_enabled():
                        self._without_grad.add(name)

        return hook

    @contextmanager
    def capturing(self, attention_mask: torch.Tensor | None = None) -> Iterator[BlockIO]:
        """Record block inputs/outputs during the forward passes run inside this context."""
        self.clear()
        self._mask = attention_mask
        self._grad_at_start = torch.is_grad_enabled()
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def captured(self) -> list[str]:
        """Names of the blocks whose input and output were both recorded."""
        return [b.name for b in self.blocks if b.name in self._inputs and b.name in self._outputs]

    def _masked(self, tensor: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is not None and tensor.dim() == 3 and tuple(tensor.shape[:2]) == tuple(mask.shape):
            # Padding tokens are zeroed in both input and output: they add nothing to any distance.
            tensor = tensor * mask.to(tensor.dtype).unsqueeze(-1)
        return tensor

    def raw(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's input and output tensors as recorded (padding zeroed), original shapes."""
        if name not in self._inputs or name not in self._outputs:
            raise KeyError(f"block {name!r} was not run inside capturing(); recorded: {self.captured()}")
        x, y = self._inputs[name], self._outputs[name]
        if self._adds_input[name]:  # a sub-layer: its output is the residual stream after its branch is added
            y = x + y
        return self._masked(x), self._masked(y)

    def features(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's input and output as ``(batch, features)`` matrices (``flatten(1)``, padding zeroed)."""
        x, y = self.raw(name)
        return x.flatten(1), y.flatten(1)

    def recorded_without_grad(self) -> list[str]:
        """The blocks whose output was recorded with autograd off inside a capture that began with it on, although
        the module that produced it has trainable parameters: what happens inside a layer checkpointed with
        ``use_reentrant=True`` (its forward runs under ``torch.no_grad()``), where a sub-layer's output is recorded.
        A penalty on them has no gradient to those parameters. (A whole forward pass run under ``no_grad``, e.g. to
        measure, is not flagged.)"""
        return [
            name
            for name in self.captured()
            if name in self._without_grad and any(p.requires_grad for p in self._output_modules[name].parameters())
        ]

    def clear(self) -> None:
        """Forget the recorded tensors (and the autograd graph they hold on to)."""
        self._inputs.clear()
        self._outputs.clear()
        self._without_grad.clear()
        self._mask = None

    def token_mask(self, name: str) -> torch.Tensor | None:
        """``(batch, tokens)`` boolean mask of real tokens for sequence features, else ``None``."""
        x = self._inputs.get(name)
        mask = self._mask
        if mask is not None and x is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return mask.bool()
        return None

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> BlockIO:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def feature_mask(model: nn.Module, batch: dict) -> torch.Tensor | None:
    """Which token positions of ``batch`` count in block features: real tokens (``attention_mask``) whose prediction
    is trained. With token-level ``labels`` (``-100`` on a prompt in SFT data, on unmasked tokens in masked LM), a
    position counts only if its label is not ``-100``; in a causal LM position ``t`` predicts the label at ``t + 1``.
    ``None`` when the batch says nothing (every position counts).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_collapse.block_io import feature_mask
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> ids = torch.tensor([[5, 6, 7, 8]])
        >>> feature_mask(llama, {"input_ids": ids, "labels": torch.tensor([[-100, -100, 7, 8]])})
        tensor([[False,  True,  True, False]])
    """
    mask = batch.get("attention_mask")
    mask = mask.bool() if mask is not None else None
    labels, ids = batch.get("labels"), batch.get("input_ids")
    if labels is None or ids is None or labels.shape != ids.shape:
        return mask
    trained = labels != -100
    if is_causal_lm(model):  # the feature at t predicts the token at t + 1; the last position predicts nothing
        trained = torch.cat([trained[:, 1:], torch.zeros_like(trained[:, :1])], dim=1)
    return trained if mask is None else mask & trained
