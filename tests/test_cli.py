"""The exfx command (exfx.cli)."""

from __future__ import annotations

import json
import sys

import pytest

import exfx
from exfx.cli import main

from specs import mlp


def test_explain_default_example_prints_site_table(capsys):
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "SmallCNN: 3 of 4 ReLUs are ENP sites" in out
    assert "contraction axis is a model input" in out
    assert "features.3" in out and "classifier.1" in out


def test_explain_json_matches_api(capsys):
    assert main(["explain", "specs:mlp", "--rule", "ztest", "--alpha", "0.1", "--samples", "8,16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    model, inputs = mlp()
    expected = exfx.explain(model, inputs, exfx.Config(rule="ztest", alpha=0.1, samples=(8, 16))).to_dict()
    assert data == json.loads(json.dumps(expected))


def test_flops_reports_saving(capsys):
    assert main(["flops", "specs:mlp", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["executed"] < data["dense"]
    assert "2 FLOPs per multiply-add" in data["convention"]


def test_plan_round_trip_through_cli(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["plan", "specs:mlp", "--samples", "16", "-o", str(path)]) == 0
    plan = exfx.Plan.load(path)
    assert set(plan.sites) == {"2"} and plan.sites["2"].samples == (16,)
    assert main(["explain", "specs:mlp", "--plan", str(path), "--json"]) == 0
    assert "wrote a plan for 1 sites" in capsys.readouterr().out


def test_plan_command_keeps_the_plan_and_fills_in_unset_sites_from_the_options(tmp_path, capsys):
    """`exfx plan --plan p.json --rule ztest` used to copy p.json and silently drop --rule."""
    partial = tmp_path / "partial.json"
    exfx.Plan(sites={"features.3": exfx.SiteParams(threshold=-0.5, samples=8)}).save(partial)
    merged = tmp_path / "merged.json"
    assert main(["plan", "--plan", str(partial), "--rule", "ztest", "--samples", "16", "-o", str(merged)]) == 0
    err = capsys.readouterr().err
    assert "apply only to the sites the plan" in err and "features.7, classifier.1" in err
    plan = exfx.Plan.load(merged)
    assert plan.sites["features.3"] == exfx.SiteParams(threshold=-0.5, samples=8)
    assert plan.sites["features.7"] == plan.sites["classifier.1"] == exfx.SiteParams(rule="ztest", samples=16)
    assert plan.fingerprint is not None  # the merged plan carries the model's signatures


def test_plan_command_says_which_sites_it_fills_in_with_the_defaults(tmp_path, capsys):
    partial = tmp_path / "partial.json"
    exfx.Plan(sites={"features.3": exfx.SiteParams(threshold=-0.5, samples=8)}).save(partial)
    assert main(["plan", "--plan", str(partial), "-o", str(tmp_path / "full.json")]) == 0
    err = capsys.readouterr().err
    assert "does not set features.7, classifier.1: written with the default settings (threshold" in err


def test_options_that_a_plan_overrides_everywhere_are_refused(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["plan", "specs:mlp", "-o", str(path)]) == 0
    capsys.readouterr()
    for command in ("explain", "flops", "graph"):
        assert main([command, "specs:mlp", "--plan", str(path), "--samples", "16"]) == 2
        err = capsys.readouterr().err
        assert "--samples would change nothing" in err and "sets every site (2)" in err


@pytest.mark.parametrize("content, message", [
    (b"<<<<<<< HEAD\n", "line 1 is not exfx graph text"),
    (b"\xff\xfe graph", "is not UTF-8 text"),
])
def test_a_broken_golden_file_is_an_exfx_error(tmp_path, capsys, content, message):
    """A merge-conflict line or a binary file in place of the golden file ended in a bare traceback."""
    golden = tmp_path / "g.txt"
    golden.write_bytes(content)
    assert main(["check", "specs:mlp", str(golden), "--structural"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exfx: error: golden file") and message in err and "--update" in err


@pytest.mark.parametrize("options, message", [
    (["--alpha", "0.3"], "--alpha is the z-test's level, but the rule is threshold"),
    (["--rule", "ztest", "--threshold", "-1"], "--threshold is the threshold rule's, but the rule is ztest"),
])
def test_an_option_of_the_other_rule_is_refused(capsys, options, message):
    """`exfx explain --alpha 0.3` (threshold rule) was accepted and changed nothing."""
    assert main(["flops", "specs:mlp", *options]) == 2
    assert message in capsys.readouterr().err


def test_check_exit_codes(tmp_path, capsys):
    golden = tmp_path / "g.txt"
    assert main(["check", "specs:mlp", str(golden), "--update"]) == 0
    assert main(["check", "specs:mlp", str(golden)]) == 0
    assert main(["check", "specs:mlp_widened", str(golden)]) == 1
    out = capsys.readouterr().out
    assert "site 2: linear 64->64" in out and "linear 64->96" in out
    assert main(["check", "specs:mlp_widened", str(golden), "--format", "markdown"]) == 1
    assert "```diff" in capsys.readouterr().out


def test_diff_and_graph_commands(capsys):
    assert main(["diff", "specs:mlp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("site 0:") and "+++ exfx" in out
    assert "_2_partial_sum_1 = call_function exfx.partial_sum" in out
    assert main(["graph", "specs:mlp", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("```text\n# exfx graph")


@pytest.mark.parametrize("argv, message", [
    (["explain", "nosuchmodule:factory"], "cannot import"),
    (["explain", "specs"], "SPEC must look like"),
    (["explain", "specs:missing"], "no callable"),
    (["explain", "specs:not_a_pair"], "must return (model, example_inputs)"),
    (["explain", "specs:mlp", "--alpha", "0.9", "--rule", "ztest"], "alpha"),
])
def test_bad_input_exits_2_with_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_exits_2_with_message(tmp_path, capsys):
    """A plan or golden file that cannot be written ended the command with a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["plan", "specs:mlp", "-o", str(blocker / "plan.json")]) == 2
    assert "exfx: error:" in capsys.readouterr().err
    assert main(["check", "specs:mlp", str(blocker / "golden.txt"), "--update"]) == 2
    assert "exfx: error:" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["2", "-0.1", "nan", "one"])
def test_demo_budget_is_checked_before_running(budget, capsys):
    """`exfx demo --budget 2` loaded the model and data, then died in calibrate with a ValueError traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--budget", budget])
    assert exit_info.value.code == 2
    assert f"--budget must be an absolute metric drop in [0, 1) (0.01 = 1 point, 0.001 = 0.1 point), got {budget!r}" \
        in capsys.readouterr().err


def test_spec_module_in_the_current_directory(tmp_path, monkeypatch, capsys):
    """The exfx console script has its own directory, not the current one, on sys.path (python -m has the
    current one): `exfx check mypkg.models:small` could not import the project's own uninstalled models."""
    (tmp_path / "exfx_cwd_models.py").write_text("from specs import mlp\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "exfx_cwd_models", raising=False)
    assert main(["explain", "exfx_cwd_models:mlp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sites"][1]["name"] == "2"


def test_a_factory_returning_the_wrong_pair_is_named(tmp_path, monkeypatch, capsys):
    """A pair whose first item is not a module was reported as 'got tuple'."""
    (tmp_path / "exfx_cwd_pairs.py").write_text("import torch\ndef swapped():\n    return torch.ones(2), 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["explain", "exfx_cwd_pairs:swapped"]) == 2
    assert "with model a torch.nn.Module, got (Tensor, int)" in capsys.readouterr().err
