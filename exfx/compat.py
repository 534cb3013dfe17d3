"""Import paths of exfx 0.1 that moved when the stages got their own folders: they still work, with a warning.

``from exfx.flops import count_flops`` or ``from exfx.calibrate import evaluate``
keep working: :func:`install` puts a stand-in module under each old name in
``sys.modules``, whose attributes come from the new modules and warn with a
:class:`DeprecationWarning` that names where they live now. ``exfx.calibrate`` and
``exfx.backend`` are the functions, as they always were; only their modules moved
(to :mod:`exfx.tune.calibration` and :mod:`exfx.dynamo_backend`), so that no
function hides a module of the same name any more.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["MOVED_MODULES", "install"]

#: Old module -> the modules its public names now live in, searched in order.
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "exfx.calibrate": ("exfx.tune.evaluation", "exfx.tune.calibration", "exfx.tune.search"),
    "exfx.backend": ("exfx.dynamo_backend",),
    "exfx.flops": ("exfx.cost.flops",),
    "exfx.graphdiff": ("exfx.ci.graphdiff",),
    "exfx.spec": ("exfx.ci.spec",),
    "exfx.pareto": ("exfx.tune.pareto",),
    "exfx.dynamo_capture": ("exfx.capture.dynamo",),
    "exfx.ops.enp_ops": ("exfx.ops.enp", "exfx.cost.model"),
}


class MovedModule(types.ModuleType):
    """A stand-in for a moved module: each attribute read warns and returns the name from its new home."""

    def __init__(self, old: str, new: Sequence[str]) -> None:
        super().__init__(old, f"Moved: import from {' or '.join(new)} instead.")
        self.__exfx_new__ = tuple(new)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for new in self.__exfx_new__:
            module = importlib.import_module(new)
            if hasattr(module, name):
                warnings.warn(f"{self.__name__}.{name} moved to {new}.{name}", DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self.__exfx_new__)}) has no "
                             f"attribute {name!r}")


def install() -> None:
    """Register the stand-ins (idempotent; a real module of the same name is never replaced)."""
    for old, new in MOVED_MODULES.items():
        sys.modules.setdefault(old, MovedModule(old, new))
