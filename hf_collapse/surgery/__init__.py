"""Structural surgery on Hugging Face models, recorded so that a saved model rebuilds exactly.

* :mod:`~hf_collapse.surgery.record`: the ``hf_collapse`` record in the config, and the registry of edit kinds;
* :mod:`~hf_collapse.surgery.blocks`: find blocks and sub-layers, remove them (``"remove_blocks"``,
  ``"remove_sublayers"``);
* :mod:`~hf_collapse.surgery.sites`: activation sites by name;
* :mod:`~hf_collapse.surgery.linearize`: linearize an activation site and fuse the maps around it (``"linearize"``);
* :mod:`~hf_collapse.surgery.trial`: edit in place and put the model back (trials without a copy).

Importing this package registers every built-in edit kind: a saved record resolves in any process that imported
``hf_collapse.surgery`` (``AutoCollapsedModel`` does), whatever else it imported.
"""

from .blocks import GRANULARITIES, block_aliases, find_blocks, remove_blocks
from .linearize import linearize_site
from .record import (
    COLLAPSED_ADAPTER_MESSAGE,
    EDIT_OPS,
    RECORD_FORMAT_VERSION,
    RECORD_KEY,
    EditOp,
    collapse_record,
    edit_op,
    is_peft_model,
    known_edit_ops,
    model_class_name,
    record_edit,
    register_edit_op,
    validate_record,
)
from .sites import activation_sites, all_sites, record_name, site_name, site_spellings
from .trial import reverted

__all__ = [
    "COLLAPSED_ADAPTER_MESSAGE",
    "EDIT_OPS",
    "GRANULARITIES",
    "RECORD_FORMAT_VERSION",
    "RECORD_KEY",
    "EditOp",
    "activation_sites",
    "all_sites",
    "block_aliases",
    "collapse_record",
    "edit_op",
    "find_blocks",
    "is_peft_model",
    "known_edit_ops",
    "linearize_site",
    "model_class_name",
    "record_edit",
    "record_name",
    "register_edit_op",
    "remove_blocks",
    "reverted",
    "site_name",
    "site_spellings",
    "validate_record",
]
