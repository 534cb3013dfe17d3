"""The exceptions exfx raises.

Every error exfx raises on bad input derives from :class:`ExfxError`, names the
node, site or field at fault, and says what to do about it. Catch ``ExfxError``
to handle them all. Every warning derives from :class:`ExfxWarning` (a
``UserWarning``): filter that one to silence them all.
"""

from __future__ import annotations

__all__ = [
    "ExfxError",
    "CaptureError",
    "TrainingModeError",
    "UnsupportedModelError",
    "PlanError",
    "PlanMismatchError",
    "DistributedError",
    "ExfxWarning",
]


class ExfxError(Exception):
    """Base class of every exfx error."""


class CaptureError(ExfxError):
    """The model could not be captured as a torch.fx graph.

    The message names the module or operation that failed to trace and suggests
    a fix (mark it as a leaf module, pass concrete args, or trace it yourself and
    hand exfx the GraphModule).
    """


class TrainingModeError(ExfxError):
    """The model (or one of its submodules) is in training mode; call ``.eval()``."""


class UnsupportedModelError(ExfxError):
    """The model was captured but something in it cannot be handled (bad example inputs, shapes)."""


class PlanError(ExfxError):
    """A plan file or a per-site parameter is invalid (corrupt JSON, bad field, samples >= fan-in)."""


class PlanMismatchError(PlanError):
    """A plan was made for a different model; the message lists the mismatched sites."""


class DistributedError(ExfxError):
    """The ranks of a ``torch.distributed`` calibration disagree (an argument, the model) or one has no data;
    the message names the rank and the field."""


class ExfxWarning(UserWarning):
    """exfx went on, but the result may not be what was meant: e.g. :func:`exfx.calibrate` found no
    site to tune (the message gives each ReLU's reason); :class:`exfx.PruneWarning` derives from it."""
