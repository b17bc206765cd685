"""TLC (Liao et al., "Till the Layers Collapse", AAAI 2025): collapse activation layers that pre-activation
statistics show to be (almost) always ON or OFF, and fuse the linear maps that become adjacent."""

from .compress import compress
from .config import TLCConfig
from .statistics import SiteStatistics, activation_sites, activation_statistics
from .transforms import linearize

__all__ = ["SiteStatistics", "TLCConfig", "activation_sites", "activation_statistics", "compress", "linearize"]
