"""TLC (Liao et al., "Till the Layers Collapse", AAAI 2025): collapse activation layers that pre-activation
statistics show to be (almost) always ON or OFF, and fuse the linear maps that become adjacent.

Site names are relative to the model passed (``"bert.encoder.layer.3.intermediate.intermediate_act_fn"``);
:func:`compress` is a search of the collapse engine: it writes its progress after every step and continues from it
with ``resume_from=`` (format: :mod:`hf_collapse.engine.progress`)."""

from ..surgery import activation_sites
from .compress import compress
from .config import TLCConfig
from .statistics import SiteStatistics, activation_statistics
from .transforms import linearize

__all__ = ["SiteStatistics", "TLCConfig", "activation_sites", "activation_statistics", "compress", "linearize"]
