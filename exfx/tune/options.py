"""The calibration options: one frozen, checked :class:`CalibrationOptions` for :func:`exfx.calibrate`.

:func:`exfx.calibrate` and :func:`exfx.calibrate_budgets` take ``options=`` (a
:class:`CalibrationOptions`) and any of its fields as keywords, which override it;
:meth:`CalibrationOptions.from_kwargs` is the one place those keywords become options,
and the options check themselves when built, before any pass runs.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from exfx.capture.options import CaptureOptions
from exfx.config import Config, SiteParams

__all__ = ["CalibrationOptions", "DEFAULT_SCHEDULES", "DEFAULT_ALPHAS", "check_schedules", "check_distributed"]

#: Every checkpoint schedule over {8, 16, 32, 64} (a site takes those that fit its fan-in): pricing is
#: offline, so more candidates cost no evaluation, only a little more work in the instrumented pass.
DEFAULT_SCHEDULES: tuple[tuple[int, ...], ...] = tuple(
    tuple(k for k, bit in zip((8, 16, 32, 64), f"{mask:04b}"[::-1]) if bit == "1") for mask in range(1, 16))
DEFAULT_ALPHAS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)

#: The options every rank must pass alike under ``torch.distributed`` (see :meth:`CalibrationOptions.rank_arguments`).
_SHARED_BY_RANKS = ("config", "schedules", "alphas", "max_evals", "max_neurons", "seed", "confidence", "sensitivity")


def check_schedules(schedules: Iterable[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """The candidate checkpoint schedules as tuples, after checking that there is one and that each is valid."""
    if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Iterable):
        raise ValueError(f"schedules must be a sequence of checkpoint schedules such as ((16, 32),), "
                         f"got {schedules!r}")
    schedules = tuple(schedules)
    if not schedules:
        raise ValueError("schedules must name at least one checkpoint schedule")
    checked = []
    for schedule in schedules:
        if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Iterable):
            raise ValueError(f"schedules must be a sequence of checkpoint schedules such as ((16, 32),); "
                             f"{schedule!r} is not one")
        schedule = tuple(schedule)
        SiteParams(samples=schedule)  # validates: positive, strictly increasing
        checked.append(schedule)
    return tuple(checked)


def check_distributed(distributed: Any) -> bool | None:
    """``distributed`` itself, after checking it is True, False or None."""
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True, False or None (detect), got {distributed!r}")
    return distributed


def _check_integer(name: str, value: Any, least: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (least is not None and value < least):
        raise ValueError(f"{name} must be an integer" + (f" of at least {least}" if least is not None else "")
                         + f", got {value!r}")


@dataclass(frozen=True)
class CalibrationOptions:
    """How :func:`exfx.calibrate` and :func:`exfx.calibrate_budgets` search; every field is also their keyword.

    Example::

        >>> options = exfx.CalibrationOptions(confidence=0.95, max_evals=8, progress=False)
        >>> plan = exfx.calibrate(model, (x,), val, accuracy, 0.01, options=options)
        >>> same = exfx.calibrate(model, (x,), val, accuracy, 0.01, confidence=0.95, max_evals=8, progress=False)

    Attributes:
        config: if given, restricts the search to ``config.rule`` and the single
            schedule ``config.samples`` (its threshold or alpha is searched, not
            taken); by default both rules and every schedule in ``schedules``.
        schedules: candidate checkpoint schedules (a site takes those that fit its fan-in; a site
            that fits none is disabled in the plan). Each starts at 2 samples or more.
        alphas: candidate z-test levels, in [0, 0.5].
        max_evals: at most this many full evaluations after the baseline (the binary search stops
            earlier once it has pinned the budget's edge on the path); at least 2.
        max_neurons: neurons sampled per site by the instrumented pass.
        seed: seeds the neuron sample (and the bootstrap); same seed and data, same plan.
        confidence: if set (e.g. 0.95, in [0.5, 1)), a plan must also keep the upper
            ``confidence`` quantile of its drop under a paired bootstrap of the
            examples within the budget: a guard against a small calibration set
            that happens to hide flipped predictions. Default: the plain drop.
        sensitivity: how a false prune's damage is weighed across sites.
            ``"gradient"`` (default): first-order output energy, from one
            backward pass per batch of a random projection of the outputs, so
            a site whose errors the later layers amplify costs more.
            ``"mass"``: the pruned share of the site's own activation mass, the
            same at every site.
        progress: show tqdm bars (default: when attached to a terminal).
        capture_options: the capture options of :func:`exfx.compile`
            (:class:`exfx.CaptureOptions`, or a dict of its fields), used for every
            compile and analysis; compile the plan with the same ones. Must be the
            defaults when calibrating an :class:`exfx.Analysis` (captured already).
        distributed: calibrate over the ranks of ``torch.distributed`` (default
            None: when a process group of more than one rank is initialised;
            True: it must be; False: this process alone, on its own data). Every
            rank calls ``calibrate`` with the same arguments and its own shard of
            the data (:func:`exfx.shard_batches`); each rank instruments and
            evaluates its shard, and every rank returns the same plan: the one a
            single process returns on the shards concatenated in rank order.
            Save it from rank 0 only. See :mod:`exfx.tune.distributed`.

    Raises:
        TypeError: ``config`` is not an :class:`exfx.Config`, or ``capture_options`` is
            neither capture options nor a dict of them.
        ValueError: a field is out of its range, or ``config`` is given with ``schedules``
            (the message names the field).
    """

    config: Config | None = None
    schedules: tuple[tuple[int, ...], ...] = DEFAULT_SCHEDULES
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    max_evals: int = 10
    max_neurons: int = 200_000
    seed: int = 0
    confidence: float | None = None
    sensitivity: str = "gradient"
    progress: bool | None = None
    capture_options: CaptureOptions = field(default_factory=CaptureOptions)
    distributed: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedules", check_schedules(self.schedules))
        if self.config is not None and not isinstance(self.config, Config):
            raise TypeError(f"config must be an exfx.Config, got {type(self.config).__name__}")
        if self.config is not None and self.schedules != DEFAULT_SCHEDULES:
            raise ValueError("pass config (one rule and its schedule, config.samples) or schedules, not both")
        starting_at_1 = [schedule for schedule in self.search_schedules if schedule[0] < 2]
        if starting_at_1:
            raise ValueError(f"calibrate needs every schedule to start at 2 samples or more, got {starting_at_1}: "
                             "the instrumented pass records the z-test statistic (a sample variance) at every "
                             "checkpoint")
        alphas = (tuple(self.alphas) if isinstance(self.alphas, Iterable) and not isinstance(self.alphas, str)
                  else None)  # a numpy array too
        if not alphas or any(isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 <= a <= 0.5
                             for a in alphas):
            shown = list(alphas) if alphas is not None else self.alphas
            raise ValueError(f"alphas must be z-test levels in [0, 0.5], got {shown!r}")
        object.__setattr__(self, "alphas", alphas)
        _check_integer("max_evals", self.max_evals, 2)
        _check_integer("max_neurons", self.max_neurons, 1)
        _check_integer("seed", self.seed)
        if self.confidence is not None and (isinstance(self.confidence, bool)
                                            or not isinstance(self.confidence, numbers.Real)
                                            or not 0.5 <= self.confidence < 1.0):
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence!r}")
        if self.sensitivity not in ("gradient", "mass"):
            raise ValueError(f"sensitivity must be 'gradient' or 'mass', got {self.sensitivity!r}")
        object.__setattr__(self, "capture_options", CaptureOptions.of(self.capture_options))
        check_distributed(self.distributed)

    @classmethod
    def from_kwargs(cls, options: CalibrationOptions | None = None, /, **kwargs: Any) -> CalibrationOptions:
        """``options`` (default: the defaults) with the fields named in ``kwargs`` replaced, all checked.

        The one place where :func:`exfx.calibrate`'s and :func:`exfx.calibrate_budgets`' keywords
        become options.

        Raises:
            TypeError: ``options`` is not a :class:`CalibrationOptions`, or a keyword is not one of its fields.
        """
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be an exfx.CalibrationOptions, got {type(options).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [name for name in kwargs if name not in names]
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}: the calibration "
                            f"options are the fields of exfx.CalibrationOptions ({', '.join(names)})")
        if options is None:
            return cls(**kwargs)
        return replace(options, **kwargs) if kwargs else options

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules searched: ``config.rule`` alone, or both."""
        return ("threshold", "ztest") if self.config is None else (self.config.rule,)

    @property
    def search_schedules(self) -> tuple[tuple[int, ...], ...]:
        """The schedules searched: ``config.samples`` alone, or every one of :attr:`schedules`."""
        return self.schedules if self.config is None else (tuple(self.config.samples),)

    def rank_arguments(self) -> dict[str, Any]:
        """The options every rank must pass alike under ``torch.distributed``, by name.

        ``progress`` and ``distributed`` may differ by rank, and the capture options are not compared
        (they may hold objects without a stable ``repr``): the ranks compare their analysed models instead.
        """
        return {name: getattr(self, name) for name in _SHARED_BY_RANKS}
