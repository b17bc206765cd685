"""Trial edits without a copy: :func:`reverted` puts a model back exactly as it was after edits made in place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .. import compat

__all__ = ["reverted"]


@contextlib.contextmanager
def reverted(model: nn.Module) -> Iterator[nn.Module]:
    """Edit ``model`` in place inside this context, and get it back exactly as it was after: a trial removal without a
    copy of the weights (what scoring by removal needs on a model that does not fit twice in memory).

    Restores what :func:`remove_blocks` (blocks or sub-layers, ``inplace=True``) changes: every module's children,
    parameters, buffers and attributes (``layer_idx``, a diffusers model's config), and the attributes of every
    transformers config (layer counts, per-layer lists, the ``hf_collapse`` record). Edits that write into existing
    tensors (none of the block or sub-layer removals do) are not undone.

    Example::

        >>> from hf_collapse.surgery import reverted
        >>> with reverted(llama):
        ...     hf_collapse.remove_blocks(llama, ["model.layers.3"], inplace=True)
        ...     loss_without = llama(**batch).loss           # the model without layer 3
        >>> len(llama.model.layers)                          # back to 30, the same module objects
        30
    """
    modules = list(model.modules())
    saved = [(m, dict(vars(m)), [dict(table) for table in compat.module_tables(m)]) for m in modules]
    configs = {
        id(c): c
        for m in modules
        for c in [vars(m).get("config")]
        if c is not None and hasattr(c, "__dict__") and not isinstance(c, dict)
    }
    saved_configs = [(c, dict(vars(c))) for c in configs.values()]
    try:
        yield model
    finally:
        for module, attributes, tables in saved:
            vars(module).clear()
            vars(module).update(attributes)
            for live, original in zip(compat.module_tables(module), tables):  # the same dicts, refilled
                live.clear()
                live.update(original)
        for config, attributes in saved_configs:
            vars(config).clear()
            vars(config).update(attributes)
