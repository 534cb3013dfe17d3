"""Config validation, Plan JSON round-trip, plan/model mismatch, per-site parameters applied."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

import exfx
from exfx.meta import site_of
from exfx.config import CONFIG_VERSION, PLAN_VERSION, SiteParams
from helpers import assert_enp_invariant, enp_nodes, record_sites
from models import MLP, ResNetish

INF = float("inf")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"rule": "bogus"}, "rule"),
    ({"rule": None}, "rule"),
    ({"alpha": -0.01}, "alpha"),
    ({"alpha": 0.51}, "alpha"),
    ({"alpha": math.nan}, "alpha"),
    ({"alpha": True}, "alpha"),
    ({"samples": 0}, "samples"),
    ({"samples": -4}, "samples"),
    ({"samples": ()}, "samples"),
    ({"samples": []}, "samples"),
    ({"samples": (8, 8)}, "samples"),
    ({"samples": (16, 8)}, "samples"),
    ({"samples": (4, 0)}, "samples"),
    ({"samples": 2.5}, "samples"),
    ({"samples": (2.0, 4)}, "samples"),
    ({"samples": True}, "samples"),
    ({"samples": "32"}, "samples"),
    ({"threshold": math.nan}, "threshold"),
    ({"threshold": INF}, "threshold"),
    ({"threshold": "0"}, "threshold"),
    ({"rule": "ztest", "samples": 1}, "samples"),
    ({"rule": "ztest", "samples": (1, 8)}, "samples"),
    ({"version": 99}, "version"),
])
def test_bad_config_raises_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        exfx.Config(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"rule": "bogus"}, "rule"), ({"samples": 0}, "samples"), ({"alpha": 2.0}, "alpha"),
    ({"threshold": INF}, "threshold"), ({"enabled": "yes"}, "enabled"),
])
def test_bad_site_params_raise_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SiteParams(**kwargs)


def test_good_configs() -> None:
    assert exfx.Config().samples == (32,)
    assert exfx.Config(samples=[8, 16, 32]).samples == (8, 16, 32)
    assert exfx.Config(threshold=-INF).threshold == -INF
    assert exfx.Config(rule="ztest", alpha=0.0, samples=2).alpha == 0.0
    assert exfx.Config(rule="ztest", alpha=0.5).site_params.param == 0.5
    assert exfx.Config(threshold=-3).site_params.param == -3.0
    # The threshold rule is fine with a single sample.
    assert exfx.Config(samples=1).samples == (1,)


def test_config_is_frozen_and_hashable() -> None:
    config = exfx.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SiteParams().samples = (4,)  # type: ignore[misc]
    assert hash(exfx.Config(samples=[4, 8])) == hash(exfx.Config(samples=(4, 8)))


def test_config_dict_round_trip() -> None:
    config = exfx.Config(rule="ztest", alpha=0.1, samples=(8, 16))
    data = config.to_dict()
    assert data == {"rule": "ztest", "threshold": 0.0, "alpha": 0.1, "samples": [8, 16],
                    "version": CONFIG_VERSION}
    assert exfx.Config.from_dict(json.loads(json.dumps(data))) == config
    with pytest.raises(ValueError, match="unknown Config field"):
        exfx.Config.from_dict({**data, "thresh": 1})


# ---------------------------------------------------------------------------
# Plan round trip and corruption
# ---------------------------------------------------------------------------


@pytest.fixture
def mlp() -> tuple[nn.Module, torch.Tensor]:
    return MLP().eval(), torch.randn(8, 20)


def _plan(model: nn.Module, x: torch.Tensor, config: exfx.Config) -> exfx.Plan:
    return exfx.Plan.from_report(exfx.explain(model, (x,), config), config)


def test_plan_json_round_trip(mlp, tmp_path) -> None:
    model, x = mlp
    config = exfx.Config(rule="ztest", alpha=0.2, samples=(8, 16))
    plan = _plan(model, x, config).with_site("net.2", threshold=-INF, rule="threshold", samples=4)
    plan = plan.with_site("net.3", enabled=False)
    plan.meta["note"] = "calibrated on nothing"
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = exfx.Plan.load(path)
    assert loaded == plan
    assert loaded.fingerprint == plan.fingerprint and loaded.fingerprint is not None
    assert loaded.sites["net.2"].threshold == -INF and loaded.sites["net.2"].samples == (4,)
    data = json.loads(path.read_text())  # strict JSON: no bare Infinity
    assert data["version"] == PLAN_VERSION and data["sites"]["net.2"]["threshold"] == "-inf"
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert exfx.Plan.from_json(plan.to_json()) == plan


def test_truncated_plan_file(mlp, tmp_path) -> None:
    model, x = mlp
    path = tmp_path / "plan.json"
    _plan(model, x, exfx.Config(samples=8)).save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(exfx.PlanError, match="truncated"):
        exfx.Plan.load(path)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["signatures"].update({"net.1": "linear 64->65"}), "fingerprint"),
    (lambda d: d.update({"version": 7}), "version"),
    (lambda d: d.update({"extra": 1}), "unknown field"),
    (lambda d: d["sites"]["net.1"].update({"samples": [16, 8]}), "net.1"),
    (lambda d: d["sites"]["net.1"].update({"alpha": 3}), "alpha"),
    (lambda d: d["sites"]["net.1"].update({"colour": "red"}), "unknown field"),
    (lambda d: d["sites"].update({"net.1": [1, 2]}), "net.1"),
    (lambda d: d.update({"sites": [1]}), "sites"),
    (lambda d: d.update({"signatures": {"net.1": 5}}), "signatures"),
    (lambda d: d.update({"meta": [1, 2]}), "meta"),
    (lambda d: d.update({"meta": "notes"}), "meta"),
])
def test_corrupted_plan_raises_plan_error(mlp, tmp_path, mutate, match: str) -> None:
    model, x = mlp
    data = _plan(model, x, exfx.Config(samples=8)).to_dict()
    mutate(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(exfx.PlanError, match=match):
        exfx.Plan.load(path)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2, 3]", b"null", b""])
def test_plan_file_that_is_not_a_plan(tmp_path, content: bytes) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(exfx.PlanError):
        exfx.Plan.load(path)


def test_missing_plan_file(tmp_path) -> None:
    with pytest.raises(exfx.PlanError, match="cannot read"):
        exfx.Plan.load(tmp_path / "nope.json")


# ---------------------------------------------------------------------------
# Plans against models
# ---------------------------------------------------------------------------


def test_plan_for_a_different_model_lists_the_site(mlp) -> None:
    model, x = mlp
    config = exfx.Config(samples=8)
    plan = _plan(model, x, config)
    wider = MLP((20, 64, 72, 48, 40, 10)).eval()  # net.1 widened: net.1 and net.2 change shape
    with pytest.raises(exfx.PlanMismatchError) as info:
        exfx.compile(wider, (x,), config, plan)
    message = str(info.value)
    assert "net.1" in message and "net.2" in message and "net.3" not in message
    assert isinstance(info.value, exfx.PlanError)
    with pytest.raises(exfx.PlanMismatchError):
        exfx.explain(wider, (x,), config, plan=plan)


def test_hand_made_plan_with_unknown_site(mlp) -> None:
    model, x = mlp
    plan = exfx.Plan(sites={"net.9": SiteParams(samples=8)})
    with pytest.raises(exfx.PlanMismatchError, match="net.9"):
        exfx.compile(model, (x,), exfx.Config(samples=8), plan)


def test_plan_from_report_with_a_misspelt_site(mlp) -> None:
    model, x = mlp
    config = exfx.Config(samples=8)
    plan = _plan(model, x, config).with_site("net_2", threshold=-1.0)
    with pytest.raises(exfx.PlanMismatchError, match="net_2"):
        exfx.compile(model, (x,), config, plan)


def test_plan_with_samples_above_fan_in(mlp) -> None:
    model, x = mlp
    config = exfx.Config(samples=8)
    plan = _plan(model, x, config).with_site("net.3", samples=(8, 49))  # net.3 has fan-in 48
    with pytest.raises(exfx.PlanError, match=r"net\.3.*48") as info:
        exfx.compile(model, (x,), config, plan)
    assert not isinstance(info.value, exfx.PlanMismatchError)
    # samples equal to the fan-in are fine
    exfx.compile(model, (x,), config, plan.with_site("net.3", samples=48))


def test_plan_from_report_fits_the_same_model_with_a_site_below_the_sample_count() -> None:
    """A structurally eligible site with fan-in below the config's samples is part of the model's
    fingerprint; the plan made from that very model must still apply to it."""
    model = MLP((20, 64, 24, 64, 10)).eval()
    x = torch.randn(4, 20)
    config = exfx.Config()  # 32 samples: net.2 (fan-in 24) is not eligible
    report = exfx.explain(model, (x,), config)
    assert not report.site("net.2").eligible and report.site("net.2").structurally_eligible
    plan = exfx.Plan.from_report(report, config)
    assert plan.sites["net.2"] == exfx.SiteParams(samples=32, enabled=False)  # disabled, with the config's rule
    gm = exfx.compile(model, (x,), config, plan)
    assert [s.name for s in gm.meta["exfx_report"].eligible] == ["net.1"]
    # ... and a plan can then make that site eligible with fewer samples.
    gm = exfx.compile(model, (x,), config, plan.with_site("net.2", samples=16, enabled=True))
    assert [s.name for s in gm.meta["exfx_report"].eligible] == ["net.1", "net.2"]


def test_a_plan_made_with_many_samples_keeps_the_sites_it_excludes_dense() -> None:
    """from_report left out the sites below the sample count; compiling with the plan (and no config) then
    pruned them with the default settings, T=0 at 32 samples."""
    model = MLP((20, 64, 48, 64, 10)).eval()
    x = torch.randn(4, 20)
    config = exfx.Config(samples=64)  # net.2 (fan-in 48) is not eligible, net.1 (fan-in 64) is
    plan = exfx.Plan.from_report(exfx.explain(model, (x,), config), config)
    gm = exfx.compile(model, (x,), plan=plan)
    assert [s.name for s in gm.meta["exfx_report"].eligible] == ["net.1"]


def test_a_plan_may_be_given_as_its_file(mlp, tmp_path) -> None:
    """compile(plan="plan.json") failed with AttributeError: 'str' object has no attribute 'check_against'."""
    model, x = mlp
    plan = _plan(model, x, exfx.Config(samples=8)).with_site("net.1", enabled=False)
    path = tmp_path / "plan.json"
    plan.save(path)
    expected = exfx.compile(model, (x,), plan=plan)(x)
    for given in (path, str(path)):
        torch.testing.assert_close(exfx.compile(model, (x,), plan=given)(x), expected)
        assert not exfx.explain(model, (x,), plan=given).site("net.1").eligible
    with pytest.raises(TypeError, match="plan must be an exfx.Plan or the path of a plan JSON file, got dict"):
        exfx.compile(model, (x,), plan=plan.to_dict())


def test_per_site_plan_parameters_are_applied(mlp) -> None:
    model, x = mlp
    config = exfx.Config(threshold=0.3, samples=8)  # aggressive: every site prunes
    plan = _plan(model, x, config)
    plan = plan.with_site("net.1", enabled=False)
    plan = plan.with_site("net.2", threshold=-INF)
    plan = plan.with_site("net.3", rule="ztest", alpha=0.5, samples=(4, 16))
    gm = exfx.compile(model, (x,), config, plan)
    report = gm.meta["exfx_report"]
    assert not report.site("net.1").eligible and report.site("net.1").reason == "disabled by the plan"
    assert report.site("net.3").samples == (4, 16) and report.site("net.3").params.rule == "ztest"
    records = assert_enp_invariant(gm, x)
    assert set(records) == {"net.2", "net.3"}  # net.1 was left dense
    assert records["net.2"].pruned == 0
    assert records["net.3"].pruned > 0
    assert not [n for n in enp_nodes(gm) if site_of(n) == "net.1"]
    early_exits = {site_of(n): n.args for n in enp_nodes(gm)
                   if n.target is torch.ops.exfx.early_exit.default}
    assert early_exits["net.3"][7:9] == ("ztest", 0.5)
    assert early_exits["net.2"][7:9] == ("threshold", -INF)
    # With net.1 disabled, its post-ReLU output equals the dense model's exactly (no exfx op there).
    with torch.no_grad():
        dense_h1 = torch.relu(model.net[1](torch.relu(model.net[0](x))))
    interpreter_values = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op == "call_function" and n.target is torch.relu:
                interpreter_values[site_of(n)] = value
            return value

    with torch.no_grad():
        Grab(gm).run(x)
    torch.testing.assert_close(interpreter_values["net.1"], dense_h1, rtol=0, atol=0)


def test_plan_disabling_every_site_gives_the_original_model() -> None:
    model = ResNetish().eval()
    x = torch.randn(2, 3, 8, 8)
    config = exfx.Config(samples=8)
    plan = _plan(model, x, config)
    for site in list(plan.sites):
        plan = plan.with_site(site, enabled=False)
    gm = exfx.compile(model, (x,), config, plan)
    assert not enp_nodes(gm) and not record_sites(gm, x)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_compile_rejects_a_non_config() -> None:
    with pytest.raises(TypeError, match="exfx.Config"):
        exfx.compile(MLP().eval(), (torch.randn(2, 20),), {"threshold": 0.0})  # type: ignore[arg-type]


def test_numpy_scalars_are_accepted_and_normalised(tmp_path) -> None:
    """Calibration code hands over numpy scalars; they become plain Python numbers (JSON-ready)."""
    import numpy as np

    config = exfx.Config(threshold=np.float32(-0.5), alpha=np.float32(0.25), samples=np.array([8, 16]))
    assert config.samples == (8, 16) and all(type(s) is int for s in config.samples)
    assert type(config.threshold) is float and config.threshold == -0.5
    assert type(config.alpha) is float and config.alpha == 0.25
    params = SiteParams(threshold=np.float64(-1.0), samples=np.int64(4))
    assert params.samples == (4,) and type(params.samples[0]) is int
    plan = exfx.Plan(sites={"net.1": params})
    plan.save(tmp_path / "plan.json")
    assert exfx.Plan.load(tmp_path / "plan.json") == plan
    with pytest.raises(ValueError, match="samples"):
        exfx.Config(samples=np.float64(8.0))


def test_a_plan_in_the_config_place_is_the_plan() -> None:
    """``exfx.compile(model, (x,), plan)`` is what a user writes: the plan is applied, not refused as a config."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x = torch.randn(4, 8)
    plan = exfx.Plan.from_report(exfx.explain(model, (x,), exfx.Config(samples=8)), exfx.Config(samples=8))
    by_position = exfx.compile(model, (x,), plan).meta["exfx_report"]
    assert [s.params for s in by_position.eligible] == [s.params for s in
                                                       exfx.compile(model, (x,), plan=plan).meta["exfx_report"].eligible]
    assert by_position.eligible[0].params.samples == (8,)
    with pytest.raises(TypeError, match="give the plan once"):
        exfx.compile(model, (x,), plan, plan=plan)
