"""lookaround-dist: the Lookaround optimizer across process groups.

The public API for custom training loops is :class:`Topology` (ranks to branches),
:class:`Lookaround` (the hosted branches and the average step) and
:class:`BranchAverager` (the average step alone).
"""

from .api import Branch, Lookaround
from .averaging import AveragingError, BranchAverager
from .topology import Layout, Topology, TopologyError, validate_layout

__all__ = [
    "AveragingError", "Branch", "BranchAverager", "Layout", "Lookaround", "Topology",
    "TopologyError", "validate_layout",
]
__version__ = "0.1.0"
