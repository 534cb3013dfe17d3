"""The error and warning static pruning raises.

:class:`PruneError` derives from :class:`exfx.errors.ExfxError`, so ``except
exfx.ExfxError`` catches it with every other exfx error; its message names the
argument or the layer at fault and says what to do. :class:`PruneWarning` is
raised (as a warning) where pruning can go on but the result may be poor, for
example when a layer saw fewer samples than it has units.
"""

from __future__ import annotations

from exfx.errors import ExfxError, ExfxWarning

__all__ = ["PruneError", "PruneWarning"]


class PruneError(ExfxError):
    """Static pruning cannot proceed: a bad argument, no data, or non-finite statistics in a named layer."""


class PruneWarning(ExfxWarning):
    """Static pruning went on, but the result may be poor: a layer's statistics are weak (e.g. fewer samples
    than units), or no layer could be pruned at all (the message gives each ReLU's reason)."""
