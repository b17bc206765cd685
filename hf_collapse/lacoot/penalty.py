"""MSWPenalty: the LaCoOT penalty for any training loop (plain PyTorch, accelerate, FSDP2, a custom Trainer).

LaCoOT (Quétu et al., 2024) adds ``λ · MSW(block input, block output)`` to the task loss so that blocks learn to
act like the identity and can be removed afterwards. :class:`MSWPenalty` owns everything that term needs: which
blocks are penalized, the forward hooks that record their inputs and outputs, the warm-start directions of the
max-slice ascent and the per-block random generators (so that the run is reproducible, resumable and identical on
every DDP rank). :class:`~hf_collapse.LaCoOTTrainer` is this class inside a ``transformers.Trainer``.

What the penalty sees under DDP / FSDP: each rank's **local** batch; the directions are seeded by
``(seed, block index)``, identical on every rank. Hooks are registered on the modules themselves, so a model
wrapped or sharded after the penalty was created (DDP, ``accelerator.prepare``, FSDP2's ``fully_shard``, which
keeps the module objects) still reports to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..architectures.base import Block
from ..block_io import BlockIO, feature_mask, select_blocks
from ..ot import max_sliced_wasserstein

__all__ = ["MSWPenalty"]

_SLICINGS = ("ascent", "random")
_REDUCTIONS = ("mean", "sum")


class MSWPenalty:
    """The LaCoOT penalty: the Max-Sliced Wasserstein distance between each block's input and output.

    Create it once, on the model as built (before ``accelerator.prepare``, DDP or ``fully_shard``), run the forward
    pass inside :meth:`capture`, then call the penalty to get a differentiable scalar to add to the loss::

        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_collapse import MSWPenalty
        >>> model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=24, num_labels=2))
        >>> penalty = MSWPenalty(model, seed=0)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> batch = {"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
        ...          "labels": torch.tensor([0, 1, 0, 1])}
        >>> with penalty.capture(inputs=batch):          # records each block's input and output
        ...     loss = model(**batch).loss
        >>> loss = loss + 0.5 * penalty()                # λ = 0.5
        >>> loss.backward(); optimizer.step(); optimizer.zero_grad()
        >>> sorted(penalty.last_values())                # per block, floats, from the last call
        ['bert.encoder.layer.0', 'bert.encoder.layer.1']
        >>> penalty.remove()                             # detach the hooks when done

    Afterwards, score and remove the blocks with the smallest MSW (``hf_collapse.score_blocks(model, data,
    method="msw")`` and ``hf_collapse.collapse``).

    Args:
        model: the model to penalize (a transformers / diffusers / timm model the adapters know, possibly under
            peft). Block names are relative to it.
        blocks: ``"auto"`` (every removable block) or a list of block names (as :func:`hf_collapse.find_blocks`
            spells them, backbone-relative spellings accepted).
        slicing: ``"ascent"`` (a true max slice by projected gradient ascent, warm-started from the previous call's
            direction for each block) or ``"random"`` (the max over ``n_projections`` random directions, as POT).
        n_projections: random directions: the candidates of ``"random"``, the cold start of ``"ascent"``.
        ascent_steps: projected gradient-ascent steps per call (``"ascent"`` only; warm starts need few).
        reduction: how per-block distances combine: ``"mean"`` (as the reference implementation) or ``"sum"``.
        seed: seeds block ``i``'s generator with ``seed + i``: every rank draws the same directions.
        granularity: ``"block"``, ``"attention"`` or ``"mlp"``: the units penalized, as in ``find_blocks``.

    The distance is computed in float32, whatever the autocast region. The hooks record only inside
    :meth:`capture`, so a gradient-checkpointing recompute during the backward pass counts nothing twice.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: str | Sequence[str] = "auto",
        slicing: str = "ascent",
        n_projections: int = 50,
        ascent_steps: int = 5,
        reduction: str = "mean",
        seed: int = 0,
        granularity: str = "block",
    ):
        if slicing not in _SLICINGS:
            raise ValueError(f"slicing must be one of {_SLICINGS}, got {slicing!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if int(n_projections) != n_projections or n_projections < 1:
            raise ValueError(f"n_projections must be an integer >= 1, got {n_projections!r}")
        if int(ascent_steps) != ascent_steps or ascent_steps < 0:
            raise ValueError(f"ascent_steps must be an integer >= 0, got {ascent_steps!r}")
        self.slicing, self.n_projections, self.ascent_steps = slicing, int(n_projections), int(ascent_steps)
        self.reduction, self.seed = reduction, int(seed)
        self.model = model
        self.blocks: list[Block] = select_blocks(model, blocks, granularity)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no removable block to penalize (blocks={blocks!r})")
        # Hooks go on the modules themselves: DDP / accelerate wrappers and FSDP2 keep the same module objects.
        self.block_io = BlockIO(model, self.blocks)
        self._directions: dict[str, torch.Tensor] = {}
        self._generators = {
            block.name: torch.Generator().manual_seed(self.seed + i) for i, block in enumerate(self.blocks)
        }
        self._last_values: dict[str, float] = {}

    @property
    def block_names(self) -> list[str]:
        """The names of the penalized blocks, in order."""
        return [block.name for block in self.blocks]

    @property
    def directions(self) -> dict[str, torch.Tensor]:
        """Per block, the max-slice direction found by the last call (``slicing="ascent"``): the next warm start."""
        return self._directions

    # -- recording ------------------------------------------------------------------------------------
    @contextmanager
    def capture(
        self,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        inputs: Mapping[str, Any] | None = None,
    ) -> Iterator[MSWPenalty]:
        """Record the penalized blocks' inputs and outputs during the forward passes run inside this context.

        Token positions that should not count are zeroed in both the input and the output of every block (they then
        add nothing to any distance): padding (``attention_mask == 0``) and, with token-level ``labels``, positions
        whose prediction is not trained (``-100``: the prompt of SFT data, unmasked tokens in masked LM; in a causal LM
        position ``t`` predicts the label at ``t + 1``). Pass the batch as ``inputs=`` (its ``attention_mask``,
        ``labels`` and ``input_ids`` are read), or the tensors as ``attention_mask=`` / ``labels=``; explicit
        arguments win over the batch's. Sequence-level labels (a classifier's) leave the mask alone.

        Example::

            with penalty.capture(inputs=batch):
                loss = model(**batch).loss
            loss = loss + lam * penalty()
        """
        batch = dict(inputs) if inputs is not None else {}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        if labels is not None:
            batch["labels"] = labels
        given = batch.get("labels")
        if (
            "input_ids" not in batch
            and isinstance(given, torch.Tensor)
            and given.dim() == 2
            and not given.is_floating_point()
            and (batch.get("attention_mask") is None or batch["attention_mask"].shape == given.shape)
        ):
            batch["input_ids"] = given  # token-level labels without ids (inputs_embeds): only the shape is read
        mask = feature_mask(self.model, batch)
        with self.block_io.capturing(attention_mask=mask):
            yield self

    # -- the penalty ----------------------------------------------------------------------------------
    def _warm_start(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        """The previous call's direction for this block, fitted to this batch's feature shape.

        With dynamic padding the number of tokens changes between batches: the direction is cut or zero-padded along
        the token axis and renormalized. Any other change of shape starts cold.
        """
        previous = self._directions.get(name)
        if previous is None:
            return None
        if previous.shape != shape:
            if previous.dim() != 2 or len(shape) != 2 or previous.shape[1] != shape[1]:
                return None
            fitted = previous.new_zeros(shape)
            tokens = min(previous.shape[0], shape[0])
            fitted[:tokens] = previous[:tokens]
            if fitted.norm() < 1e-6:
                return None
            previous = fitted / fitted.norm()
        return previous.flatten()

    def block_values(self) -> dict[str, torch.Tensor]:
        """Per block, the differentiable MSW of the last :meth:`capture` (advances the ascent and the generators).

        Raises:
            RuntimeError: when a penalized block was not run inside :meth:`capture`.
        """
        missing = [name for name in self.block_names if name not in self.block_io.captured()]
        if missing:
            raise RuntimeError(
                f"MSWPenalty: blocks {missing} recorded nothing; run the forward pass inside "
                f"`with penalty.capture(...):` before calling the penalty (recorded: {self.block_io.captured()})"
            )
        blind = self.block_io.recorded_without_grad()
        if blind:
            raise RuntimeError(
                f"MSWPenalty: the outputs of {blind[:3]} were recorded without autograd although their weights train, "
                "so the penalty would have no gradient to them. This happens to sub-layer units (granularity="
                f"{self.blocks[0].kind!r}) inside layers checkpointed with use_reentrant=True, whose forward runs "
                "under no_grad. Use gradient_checkpointing_kwargs={'use_reentrant': False} (the penalty is then "
                "exact), granularity='block', or no gradient checkpointing."
            )
        values = {}
        for block in self.blocks:
            raw, raw_output = self.block_io.raw(block.name)
            x, y = raw.flatten(1), raw_output.flatten(1)
            warm = self._warm_start(block.name, raw.shape[1:])
            distance, direction = max_sliced_wasserstein(
                x,
                y,
                slicing=self.slicing,
                n_projections=self.n_projections,
                ascent_steps=self.ascent_steps,
                init_direction=None if warm is None else warm.to(x.device),
                generator=self._generators[block.name],
                return_direction=True,
            )
            if self.slicing == "ascent":
                self._directions[block.name] = direction.reshape(raw.shape[1:])
            values[block.name] = distance
        self._last_values = {name: float(value.detach()) for name, value in values.items()}
        # The distances hold what backward needs; the recorded features (and their graph) must not outlive it through
        # the optimizer step, evaluation and checkpointing.
        self.block_io.clear()
        return values

    def __call__(self) -> torch.Tensor:
        """The per-block MSW of the last :meth:`capture`, reduced (``mean`` or ``sum``): a 0-dim float32 tensor
        through which gradients flow to every penalized block (and what feeds it). Each call advances the ascent's
        warm start and the generators: call it once per captured forward pass."""
        stacked = torch.stack(list(self.block_values().values()))
        return stacked.mean() if self.reduction == "mean" else stacked.sum()

    def last_values(self) -> dict[str, float]:
        """Per block, the MSW (a float) computed by the last call; empty before the first one."""
        return dict(self._last_values)

    # -- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict]:
        """What shapes the rest of the run besides weights and optimizer: ``{"directions": {block: tensor},
        "generators": {block: generator state}}`` (CPU tensors; save it with ``torch.save``, one file per rank
        under DDP, since each rank's warm starts fit its own batches)."""
        return {
            "directions": {name: d.detach().cpu() for name, d in self._directions.items()},
            "generators": {name: g.get_state() for name, g in self._generators.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output: a resumed loop then continues exactly as the uninterrupted one.

        Raises:
            ValueError: when ``state`` is not a penalty state, or was saved for other blocks.
        """
        if not isinstance(state, Mapping) or not {"directions", "generators"} <= set(state):
            raise ValueError(
                "not an MSWPenalty state: expected a dict with 'directions' and 'generators', got "
                f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}"
            )
        unknown = (set(state["generators"]) | set(state["directions"])) - set(self._generators)
        if unknown:
            raise ValueError(
                f"the penalty state is for other blocks ({sorted(unknown)}); this penalty penalizes "
                f"{sorted(self._generators)}"
            )
        self._directions = {name: d.detach().clone() for name, d in state["directions"].items()}
        for name, generator_state in state["generators"].items():
            self._generators[name].set_state(generator_state)

    # -- lifecycle ------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the hooks from the model (the penalty records nothing afterwards)."""
        self.block_io.remove()

    def __enter__(self) -> MSWPenalty:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"MSWPenalty(blocks={len(self.blocks)}, slicing={self.slicing!r}, n_projections={self.n_projections}, "
            f"ascent_steps={self.ascent_steps}, reduction={self.reduction!r}, seed={self.seed})"
        )
