"""Configuration: global knobs (:class:`Config`) and per-site parameters (:class:`Plan`).

``Config`` is a frozen, validated dataclass; a bad field raises ``ValueError``
naming the field, and numbers (numpy scalars too) are stored as Python ``int``
and ``float``. ``Plan`` maps site names (the dotted name of the producing
module or parameter, e.g. ``layer1.0.conv1``) to :class:`SiteParams`, round-trips
through JSON and carries a fingerprint of the model it was made for, so that it
cannot silently be applied to another model.

Example::

    >>> cfg = exfx.Config(rule="ztest", alpha=0.05, samples=(16, 32))
    >>> plan = exfx.Plan.from_report(exfx.explain(model, (x,), cfg), cfg)
    >>> plan.save("plan.json"); exfx.Plan.load("plan.json") == plan
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from exfx.errors import PlanError, PlanMismatchError

logger = logging.getLogger(__name__)

__all__ = ["Config", "SiteParams", "Plan", "CONFIG_VERSION", "PLAN_VERSION", "RULES", "EXACT_RULE", "ALL_RULES",
           "DominanceParams", "DOMINANCE_VARIANCES"]

CONFIG_VERSION = 1
PLAN_VERSION = 1
#: The statistical early-exit rules: the tests ``exfx::early_exit`` runs (see :class:`Config`).
RULES = ("threshold", "ztest")
#: The lossless rule: prune only where a bound proves the ReLU outputs 0 (``exfx::exact_exit``, see :class:`Config`).
EXACT_RULE = "exact"
#: Every value ``Config.rule`` / ``SiteParams.rule`` takes.
ALL_RULES = RULES + (EXACT_RULE,)


class _SiteTable(Protocol):
    """What :meth:`Plan.from_report` reads of a report: its rows and their signatures."""

    @property
    def sites(self) -> Any: ...

    @property
    def signatures(self) -> dict[str, str]: ...


def _normalise_samples(samples: Any, field_name: str = "samples") -> tuple[int, ...]:
    """An int or an increasing sequence of positive ints -> a tuple of checkpoints."""
    if isinstance(samples, bool) or isinstance(samples, str):
        raise ValueError(f"{field_name} must be a positive int or an increasing sequence of them, got {samples!r}")
    if isinstance(samples, numbers.Integral):  # int, or a numpy integer from calibration code
        samples = (samples,)
    try:
        values = tuple(samples)
    except TypeError:
        raise ValueError(
            f"{field_name} must be a positive int or an increasing sequence of them, got {samples!r}") from None
    if not values:
        raise ValueError(f"{field_name} must name at least one checkpoint, got an empty sequence")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{field_name} must hold positive ints, got {value!r} in {samples!r}")
    values = tuple(int(v) for v in values)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{field_name} must be strictly increasing, got {values!r}")
    return values


def _as_float(value: Any) -> Any:
    """A real number (numpy scalars included) as a Python float; anything else unchanged, for the checks."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _check_rule_params(rule: Any, threshold: Any, alpha: Any, samples: tuple[int, ...], where: str) -> None:
    if rule not in ALL_RULES:
        raise ValueError(f"{where}rule must be one of {ALL_RULES}, got {rule!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"{where}threshold must be a number (use -inf to never prune), got {threshold!r}")
    if threshold == math.inf:
        raise ValueError(f"{where}threshold must be below +inf (+inf would prune every neuron), got {threshold!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 0.5:
        raise ValueError(f"{where}alpha must be in [0, 0.5] (0 never prunes, 0.5 prunes when the mean is "
                         f"negative), got {alpha!r}")
    if rule == "ztest" and samples[0] < 2:
        raise ValueError(f"{where}samples must be at least 2 under the z-test (it needs a variance), "
                         f"got {samples!r}")


@dataclass(frozen=True)
class _RuleFields:
    """The early-exit fields :class:`Config` and :class:`SiteParams` share, normalised and checked alike."""

    rule: str = "threshold"
    threshold: float = 0.0
    alpha: float = 0.05
    samples: int | tuple[int, ...] = 32
    exact: bool = False
    exact_samples: int | tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", _normalise_samples(self.samples))
        empty = isinstance(self.exact_samples, (list, tuple)) and not self.exact_samples
        object.__setattr__(self, "exact_samples", () if empty else _normalise_samples(self.exact_samples,
                                                                                      "exact_samples"))
        object.__setattr__(self, "threshold", _as_float(self.threshold))
        object.__setattr__(self, "alpha", _as_float(self.alpha))
        _check_rule_params(self.rule, self.threshold, self.alpha, self.samples, "")
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact must be a bool (add the lossless exact test at every checkpoint), "
                             f"got {self.exact!r}")
        if self.rule == EXACT_RULE:  # the exact rule alone: the flag says the same thing
            object.__setattr__(self, "exact", True)
        if self.exact_samples and not self.exact:
            raise ValueError(f"exact_samples {self.exact_samples!r} are checkpoints of the exact test: set exact=True "
                             f"(or rule='exact') too, or leave exact_samples empty")

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """Every checkpoint of the schedule: ``samples``, merged with ``exact_samples`` under the exact rule."""
        return tuple(sorted(set(self.samples) | set(self.exact_samples))) if self.exact else self.samples

    @property
    def exact_checkpoints(self) -> tuple[int, ...]:
        """Where the exact test runs: ``exact_samples`` if given (with ``samples`` too under ``rule="exact"``),
        else ``samples``; none without ``exact``."""
        if not self.exact:
            return ()
        if self.rule == EXACT_RULE or not self.exact_samples:
            return self.checkpoints
        return self.exact_samples

    @property
    def statistical(self) -> bool:
        """Whether a statistical test (threshold or z-test) runs at each checkpoint; False for ``rule="exact"``."""
        return self.rule in RULES


@dataclass(frozen=True)
class Config(_RuleFields):
    """Global knobs of the ENP rewrite.

    Args:
        rule: ``"threshold"`` prunes when the estimated mean term is below
            ``threshold``; ``"ztest"`` prunes when the one-sided z-test rejects
            "mean >= 0" at level ``alpha``.
        threshold: threshold rule only. ``-inf`` never prunes; ``0`` prunes
            whenever the estimate is negative. The paper tunes it in [-30, 0].
        alpha: z-test only, in [0, 0.5]. ``0`` never prunes.
        samples: units summed before each early-exit test; an int or an
            increasing schedule such as ``(16, 32, 64)``. A site is eligible when
            its fan-in is at least the last checkpoint.
        exact: also run the lossless test at every checkpoint: a neuron is pruned
            when the statistical rule says so OR when ``partial + bias + residual +
            bound < 0``, where the bound (norms of the positive weights times norms
            of the input, per block) covers the units not yet summed: a proof that
            its ReLU outputs 0.
            Needs a provably non-negative input (after a ReLU or a pool of one); a
            config applies it only at the sites where the analysis proves that
            (``explain`` says why not elsewhere), a plan that asks for it elsewhere
            is refused. ``rule="exact"`` runs the lossless test alone (no accuracy
            cost; ``threshold`` and ``alpha`` unused) and sets ``exact``.
        exact_samples: with ``exact`` and a statistical rule, the checkpoints of
            the exact test, merged into the schedule (by default, empty, it runs
            at ``samples``). The statistical test still runs at ``samples`` only.
            The bound proves most late in the sum (e.g. at 15/16 of the fan-in),
            where a statistical test would prune more than it was calibrated
            for. Under ``rule="exact"`` they are simply more checkpoints.

    Off by default: ``exact`` costs a bound per tested neuron and saves only what
    it can prove.

    The defaults are the paper's untuned operating point (threshold 0 at 32
    samples); calibrate per-site parameters for an accuracy budget.
    """

    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.version != CONFIG_VERSION:
            raise ValueError(f"version must be {CONFIG_VERSION}, got {self.version!r}")

    @property
    def site_params(self) -> SiteParams:
        """These settings as the parameters of one site."""
        return SiteParams(rule=self.rule, threshold=self.threshold, alpha=self.alpha, samples=self.samples,
                          exact=self.exact, exact_samples=self.exact_samples)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = list(self.samples)
        data["exact_samples"] = list(self.exact_samples)
        for key in ("exact", "exact_samples"):  # written only when set, so configs without them read as before
            if not data[key]:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown Config field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


@dataclass(frozen=True)
class SiteParams(_RuleFields):
    """Early-exit parameters of one site (see :class:`Config` for the meaning).

    ``enabled=False`` leaves the site dense.
    """

    enabled: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, got {self.enabled!r}")

    @property
    def param(self) -> float:
        """The number the early-exit op takes: the threshold, or alpha for the z-test (0 for the exact rule)."""
        if self.rule == EXACT_RULE:
            return 0.0
        return float(self.threshold) if self.rule == "threshold" else float(self.alpha)

    def without_exact(self) -> SiteParams:
        """These parameters where the exact rule is unavailable: the statistical rule alone, or disabled for
        ``rule="exact"``."""
        if not self.exact:
            return self
        if self.rule == EXACT_RULE:
            return replace(self, enabled=False)
        return replace(self, exact=False, exact_samples=())

    def to_dict(self) -> dict[str, Any]:
        data = {"rule": self.rule, "threshold": _float_to_json(self.threshold), "alpha": self.alpha,
                "samples": list(self.samples), "enabled": self.enabled}
        if self.exact:  # written only when set, so plans without it read as before
            data["exact"] = True
        if self.exact_samples:
            data["exact_samples"] = list(self.exact_samples)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], site: str = "?") -> SiteParams:
        if not isinstance(data, Mapping):
            raise PlanError(f"plan site {site!r}: expected an object of parameters, got {type(data).__name__}")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise PlanError(f"plan site {site!r}: unknown field(s) {sorted(unknown)}")
        values = dict(data)
        if "threshold" in values:
            values["threshold"] = _float_from_json(values["threshold"])
        try:
            return cls(**values)
        except ValueError as err:
            raise PlanError(f"plan site {site!r}: {err}") from None


#: How :class:`DominanceParams` estimates the spread of the sampled terms.
DOMINANCE_VARIANCES = ("sample", "pooled")


@dataclass(frozen=True)
class DominanceParams:
    """Dominance prediction for the prediction head (opt-in: ``Analysis.compile(..., dominance=...)``).

    When only the top-1 class matters (greedy decoding, classification), the head's logits are first estimated
    from ``samples`` of its ``n`` exchangeable input units; a class is completed exactly only when its upper
    bound can still beat the best lower bound, and every other class's logit is ``-inf``.

    Args:
        samples: sampled units before each dominance test: an int or an increasing schedule such as
            ``(16, 64)`` (each later test runs on the classes still kept). At least 2 (a variance is needed),
            at most the units left after ``always_sampled``.
        alpha: the one-sided error level per class and test, in [0, 0.5]: the bounds are the estimate
            ``+- Phi^-1(1 - alpha)`` standard errors. ``0`` keeps every class (exact dense logits).
        always_sampled: input units (indices along the head's contraction axis) summed exactly before any
            test, outside the sample: the few hidden dimensions of outsized magnitude a trained transformer has
            (choose them on calibration data with ``exfx.passes.dominance_pass.outlier_units``).
        variance: how the spread of the sampled terms is estimated. ``"sample"`` (the default): the sample
            variance of the sampled terms, which needs their second moments (one more multiply-add per term).
            ``"pooled"``: the terms' second moment taken as the class's mean squared weight times the row's mean
            squared input over the sampled population, with the mean from the sample: half the sampled FLOPs,
            and one more assumption (squared weights and squared inputs uncorrelated across units), which fails
            for classes whose weights align with the input, so use it with enough samples and check the
            agreement on held-out data.
    """

    samples: int | tuple[int, ...] = 32
    alpha: float = 1e-3
    always_sampled: tuple[int, ...] = ()
    variance: str = "sample"

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", _normalise_samples(self.samples, "dominance.samples"))
        if self.samples[0] < 2:
            raise ValueError(f"dominance.samples must be at least 2 (the bounds need a variance), "
                             f"got {self.samples!r}")
        alpha = _as_float(self.alpha)
        if isinstance(alpha, bool) or not isinstance(alpha, float) or not 0.0 <= alpha <= 0.5:
            raise ValueError(f"dominance.alpha must be in [0, 0.5] (0 keeps every class), got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)
        units = self.always_sampled
        if isinstance(units, (str, bytes)) or not isinstance(units, (tuple, list)) or not all(
                isinstance(u, numbers.Integral) and not isinstance(u, bool) and u >= 0 for u in units):
            raise ValueError(f"dominance.always_sampled must be a sequence of unit indices (ints >= 0), "
                             f"got {units!r}")
        if len(set(units)) != len(units):
            raise ValueError(f"dominance.always_sampled must not repeat a unit, got {units!r}")
        object.__setattr__(self, "always_sampled", tuple(int(u) for u in units))
        if self.variance not in DOMINANCE_VARIANCES:
            raise ValueError(f"dominance.variance must be one of {DOMINANCE_VARIANCES}, got {self.variance!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"samples": list(self.samples), "alpha": self.alpha, "always_sampled": list(self.always_sampled),
                "variance": self.variance}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DominanceParams:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown dominance field(s) {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def _float_to_json(value: float) -> float | str:
    return value if math.isfinite(value) else ("-inf" if value < 0 else "inf")


def _float_from_json(value: Any) -> Any:
    if value in ("-inf", "inf"):
        return float(value)
    return value


def _check_keep(keep: Any) -> dict[str, float]:
    """``Plan.keep`` as ``{site: float in [0, 1]}``; a PlanError naming the field otherwise."""
    if not isinstance(keep, Mapping):
        raise PlanError(f"plan field 'keep' must map site names to keep ratios, got {type(keep).__name__}")
    checked = {}
    for site, ratio in keep.items():
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
            raise PlanError(f"plan field 'keep' site {site!r}: a keep ratio must be a number in [0, 1], "
                            f"got {ratio!r}")
        checked[str(site)] = float(ratio)
    return checked


def fingerprint(signatures: Mapping[str, str]) -> str:
    """A short stable hash of the eligible sites and their shapes."""
    text = "\n".join(f"{name}={sig}" for name, sig in sorted(signatures.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Plan:
    """Per-site parameters keyed by site name, with the fingerprint of the model.

    ``signatures`` maps every eligible site of the model the plan was made for to
    a shape signature (``"linear 512->256 units=512"``); applying the plan to a
    model whose sites differ raises :class:`~exfx.errors.PlanMismatchError` that
    lists them. A plan built by hand with no signatures is checked by site name
    only.

    ``keep`` maps a site to the share of its neurons that calibration measured it
    keeping under these parameters (:func:`exfx.calibrate` writes it); the native
    lowering prices the site at that ratio. A site it does not name is "unknown".
    """

    sites: dict[str, SiteParams] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION
    keep: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = _check_keep(self.keep)

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.signatures) if self.signatures else None

    @classmethod
    def from_report(cls, report: _SiteTable, config: Config | None = None) -> Plan:
        """A plan that gives every eligible site of ``report`` the settings of ``config``.

        Every other *structurally* eligible site (a fan-in below the sample
        count, or disabled) is written disabled, so compiling with the plan never
        falls back to the default settings for it. ``config.exact`` is written
        only where the report says the exact rule is available (a site where it
        is not gets the statistical rule alone, or is disabled under
        ``rule="exact"``). The signatures cover the same
        sites, the set the model is checked against, so the plan always fits the
        model it was made from.
        """
        params = (config or Config()).site_params
        disabled = replace(params, enabled=False)  # keeps the config's rule and samples for a later with_site

        def chosen(site: Any) -> SiteParams:  # the exact rule only where the analysis proves it may run
            return params if getattr(site, "exact_available", True) else params.without_exact()

        return cls(sites={s.name: chosen(s) if s.eligible else disabled for s in report.sites
                          if s.structurally_eligible}, signatures=dict(report.signatures))

    def check_against(self, signatures: Mapping[str, str]) -> None:
        """Raise if this plan was not made for the model whose eligible sites are ``signatures``.

        Whether each site's parameters can run there is decided with the rest of the site's fate, in
        :func:`exfx.passes.annotate_pass.decide`."""
        problems: list[str] = []
        if self.signatures:
            for name in sorted(set(self.signatures) | set(signatures)):
                mine, theirs = self.signatures.get(name), signatures.get(name)
                if mine != theirs:
                    problems.append(f"{name}: plan has {mine or 'no such site'}, model has {theirs or 'no such site'}")
        for name in sorted(set(self.sites) - set(signatures)):
            if name not in self.signatures:  # else already listed above
                problems.append(f"{name}: in the plan but not an eligible site of this model")
        if problems:
            raise PlanMismatchError(
                f"plan (fingerprint {self.fingerprint}) does not match this model (fingerprint "
                f"{fingerprint(signatures)}); mismatched sites:\n  " + "\n  ".join(problems)
                + "\nMake a new plan for this model (exfx.Plan.from_report / exfx.calibrate).")

    def to_dict(self) -> dict[str, Any]:
        data = {"version": self.version, "fingerprint": self.fingerprint, "signatures": dict(self.signatures),
                "sites": {name: p.to_dict() for name, p in self.sites.items()}, "meta": dict(self.meta)}
        if self.keep:  # written only when measured, so plans without it read as before
            data["keep"] = dict(self.keep)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"plan field 'version': expected {PLAN_VERSION}, got {version!r}")
        unknown = set(data) - {"version", "fingerprint", "signatures", "sites", "meta", "keep"}
        if unknown:
            raise PlanError(f"plan: unknown field(s) {sorted(unknown)}")
        sites, signatures = data.get("sites", {}), data.get("signatures", {})
        if not isinstance(sites, Mapping):
            raise PlanError("plan field 'sites' must be an object mapping site names to parameters")
        if not isinstance(signatures, Mapping) or not all(isinstance(v, str) for v in signatures.values()):
            raise PlanError("plan field 'signatures' must map site names to strings")
        meta = data.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise PlanError(f"plan field 'meta' must be an object, got {type(meta).__name__}")
        plan = cls(sites={str(k): SiteParams.from_dict(v, str(k)) for k, v in sites.items()},
                   signatures=dict(signatures), meta=dict(meta), keep=data.get("keep") or {})
        stored = data.get("fingerprint")
        if stored is not None and stored != plan.fingerprint:
            raise PlanError(f"plan field 'fingerprint' is {stored!r} but its signatures hash to "
                            f"{plan.fingerprint!r}: the file was edited or corrupted")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                            f"the file may be truncated") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as err:
            raise PlanError(f"cannot read plan file {os.fspath(path)!r}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise PlanError(f"plan file {os.fspath(path)!r} is not UTF-8 text") from None
        return cls.from_json(text)

    def with_site(self, name: str, **changes: Any) -> Plan:
        """A copy with one site's parameters changed.

        A disabled site stays disabled unless ``changes`` says ``enabled=True``.
        """
        sites = dict(self.sites)
        sites[name] = replace(sites.get(name, SiteParams()), **changes)
        keep = {site: ratio for site, ratio in self.keep.items() if site != name}  # measured for the old params
        return Plan(sites=sites, signatures=dict(self.signatures), meta=dict(self.meta), version=self.version,
                    keep=keep)
