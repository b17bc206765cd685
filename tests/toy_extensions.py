"""One toy of each extension point, each a small class in this one file, registered by :func:`registered_toys`: what a
contributor adds to hf_collapse to bring a new scorer, search, healing method, export format or TraDy selection."""

from __future__ import annotations

import contextlib

import torch

from hf_collapse.engine import Candidate, SearchStrategy
from hf_collapse.export import EXPORTS, ExportFormat
from hf_collapse.healing import HEALING, HealingMethod
from hf_collapse.scoring import SCORERS, BatchStatistic
from hf_collapse.searches import SEARCHES, Search
from hf_collapse.surgery import find_blocks, remove_blocks
from hf_collapse.trady import SELECTIONS, ChannelSelection


class OutputNorm(BatchStatistic):
    """A scorer: the mean norm of what a unit adds to its input (a unit that adds little is removed first)."""

    name = "toy_output_norm"
    description = "the mean norm of what a unit adds"

    def statistic(self, x, y, token_mask, generator, **options):
        return float((y.float() - x.float()).flatten(1).norm(dim=1).mean())


class LastBlocksFirst(Search):
    """A search: the last removable block first, then the one before it."""

    name = "toy_last_first"
    description = "the last blocks first"
    needs_labels = False

    def strategy(
        self, model, batches, budget, *, granularity="block", inputs, resume_from=None, progress=True, **options
    ):
        return _LastBlocksFirstStrategy(model), {}


class _LastBlocksFirstStrategy(SearchStrategy):
    def __init__(self, model):
        self.total = len([b for b in find_blocks(model) if b.removable])
        self.removed = 0

    def available(self) -> int:
        return self.total - 1 - self.removed  # a model keeps one block

    def propose(self, model, room):
        if self.available() < 1:
            return None
        name = [b for b in find_blocks(model) if b.removable][-1].name  # no block before it is renumbered
        return Candidate(units=[name], score=float(self.removed), apply=lambda m: remove_blocks(m, [name]))

    def accept(self, candidate) -> None:
        self.removed += 1

    def state(self):
        return {"removed": self.removed}

    def restore(self, state) -> None:
        self.removed = int(state["removed"])


class ScaleOutputs(HealingMethod):
    """A healing method, training-free: every kept block's last linear map scaled so that the student's hidden states
    keep the teacher's mean norm on the first batch (a crude fix of what a removal shrank)."""

    name = "toy_rescale"
    description = "rescale the last linear map to the teacher's output norm"
    trains = False

    def run(self, student, teacher, train_dataset, args, **options):
        batch = {k: torch.as_tensor(v)[None] for k, v in train_dataset[0].items() if k != "labels"}
        with torch.no_grad():
            ratio = float(
                teacher(**batch, output_hidden_states=True).hidden_states[-1].norm()
                / student(**batch, output_hidden_states=True).hidden_states[-1].norm()
            )
            last = [m for m in student.modules() if isinstance(m, torch.nn.Linear)][-2]  # not the LM head
            last.weight.mul_(ratio)
        return student


class TorchScriptExport(ExportFormat):
    """An export format: a traced TorchScript module, run by ``torch.jit.load`` (PyTorch's own runtime)."""

    name = "toy_torchscript"
    description = "a traced TorchScript module"
    runtime = "TorchScript"
    families = ("encoder",)

    def write(self, model, output, inputs):
        traced = torch.jit.trace(model, example_kwarg_inputs=dict(inputs), strict=False)
        traced.save(str(output / "model.pt"))
        return [output / "model.pt"]

    def runner(self, output, threads=1):
        module = torch.jit.load(str(output / "model.pt"))

        def run(inputs):
            outputs = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
            values = outputs.values() if isinstance(outputs, dict) else outputs
            return [v.detach().numpy() for v in values]

        return run

    def how_to_run(self, output, input_names):
        return f'`torch.jit.load("model.pt")(**{{{", ".join(repr(n) for n in input_names)}: ...}})`'


class FirstChannels(ChannelSelection):
    """A TraDy selection: the first input channels of every target layer, in forward order, until the budget is full."""

    name = "toy_first_channels"
    description = "the first channels of every layer"
    ranks_layers = False

    def draw(self, pool, budget, capacity, seed, index, rgn):
        chosen, left, room = {}, budget, capacity
        for cost in pool:
            take = int(min(cost.in_channels, left // cost.channel_cost, room // cost.weight_per_channel))
            if take:
                chosen[cost.name] = list(range(take))
                left -= take * cost.channel_cost
                room -= take * cost.weight_per_channel
        return chosen


@contextlib.contextmanager
def registered_toys():
    """The toys registered for the block, unregistered after."""
    SCORERS.register(OutputNorm())
    SEARCHES.register(LastBlocksFirst())
    HEALING.register(ScaleOutputs())
    EXPORTS.register(TorchScriptExport())
    SELECTIONS.register(FirstChannels())
    try:
        yield
    finally:
        SCORERS.unregister(OutputNorm.name)
        SEARCHES.unregister(LastBlocksFirst.name)
        HEALING.unregister(ScaleOutputs.name)
        EXPORTS.unregister(TorchScriptExport.name)
        SELECTIONS.unregister(FirstChannels.name)
