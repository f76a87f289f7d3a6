"""The mpq command line, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mpq.config import BitConfig


def mpq_cli(*args, check=True, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "mpq.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mpq {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    proc = mpq_cli("-q", "search", "--model", "digits-cnn", "--budget", "size=0.3", "--out", str(out),
                   "--profile", "inprocess", "--repeats", "5", "--frontier-points", "4")
    return out, proc


def test_search(cli_run):
    out, proc = cli_run
    assert "chosen:" in proc.stdout and "run directory" in proc.stdout
    for name in ("config.json", "report.md", "dashboard.html", "frontier.csv", "layers.csv"):
        assert (out / name).exists()
    assert "mpq -q search --model digits-cnn" in (out / "report.md").read_text()


def test_apply(cli_run, tmp_path):
    out, _ = cli_run
    proc = mpq_cli("apply", "--model", "digits-cnn", "--config", str(out / "config.json"),
                   "--out", str(tmp_path / "q.pt"))
    report = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert report["quantized_layers"] == len(BitConfig.load(out / "config.json").quantized())
    assert report["size_mb"] < report["float_size_mb"] and 0.9 < report["top1"] <= 1.0
    assert (tmp_path / "q.pt").exists()


def test_dashboard_and_report(cli_run, tmp_path):
    out, _ = cli_run
    proc = mpq_cli("dashboard", str(out), "--out", str(tmp_path / "d.html"))
    assert (tmp_path / "d.html").stat().st_size > 1_000_000 and "d.html" in proc.stdout
    assert mpq_cli("report", str(out)).stdout.strip().endswith("report.md")


def test_profile(tmp_path):
    proc = mpq_cli("-q", "profile", "--model", "digits-cnn", "--profile", "inprocess", "--repeats", "3",
                   "--out", str(tmp_path / "t.csv"))
    assert "unique workloads (from" in proc.stdout and "layer-option pairs" in proc.stdout
    assert (tmp_path / "t.csv").exists()


def test_bad_budget_exits_with_message(tmp_path):
    proc = mpq_cli("-q", "search", "--model", "digits-cnn", "--budget", "size_mb=0.001", "--out",
                   str(tmp_path / "x"), "--profile", "inprocess", "--repeats", "3", check=False)
    assert proc.returncode == 2
    assert "mpq: error:" in proc.stderr and "smallest reachable" in proc.stderr


def test_unknown_model():
    proc = mpq_cli("profile", "--model", "resnet-9000", check=False)
    assert proc.returncode != 0 and "digits-cnn" in proc.stderr


def test_models_listed():
    out = mpq_cli("models").stdout
    from mpq.models import reference_names

    listed = [line.split(":")[0] for line in out.splitlines()]
    assert listed == reference_names() and "hf-gpt2" in listed  # every bundled task, the transformers ones too


@pytest.mark.ray
@pytest.mark.slow
def test_readme_demo_on_ray(tmp_path):
    """The README's demo command itself: Ray-profiled, default settings."""
    out = tmp_path / "demo"
    mpq_cli("-q", "search", "--model", "digits-cnn", "--budget", "size=0.3", "--out", str(out))
    run = json.loads((out / "run.json").read_text())
    assert run["profile"]["backend"] == "ray"
    assert run["profile"]["measured"] + run["profile"]["cache_hits"] == run["profile"]["workloads"]


def test_sensitivity_report(tmp_path):
    proc = mpq_cli("-q", "sensitivity-report", "--model", "digits-cnn", "--out", str(tmp_path / "est"),
                   "--estimators", "lrp,entropy", "--configs", "8")
    assert "tau_config" in proc.stdout and "lrp" in proc.stdout
    assert (tmp_path / "est" / "estimators.csv").exists() and (tmp_path / "est" / "estimators.html").exists()


def test_search_with_pareto_solver(tmp_path):
    out = tmp_path / "p"
    mpq_cli("-q", "search", "--model", "digits-cnn", "--budget", "size=0.3", "--out", str(out), "--profile",
            "inprocess", "--repeats", "3", "--frontier-points", "4", "--solver", "pareto")
    run = json.loads((out / "run.json").read_text())
    assert run["solver"].startswith("pareto") and (out / "frontier.csv").exists()


def test_search_with_refine_solver(tmp_path):
    """--solver ilp+refine from the command line: the study supplies the measured damage; run.json records both
    damages (refined no worse than the ILP's) and the sensitivity spot check's tau."""
    out = tmp_path / "r"
    mpq_cli("-q", "search", "--model", "digits-cnn", "--budget", "size=0.3", "--out", str(out), "--profile",
            "inprocess", "--repeats", "3", "--frontier-points", "4", "--no-evaluate-frontier", "--solver",
            "ilp+refine", "--solver-options", '{"max_evals": 12, "time_limit": 60}')
    run = json.loads((out / "run.json").read_text())
    stats = run["solver_stats"]
    assert run["solver"] == "ilp+refine" and 1 <= stats["evaluations"] <= 12
    assert stats["damage"] <= stats["ilp_damage"]
    assert run["estimator"] == "fisher" and run["sensitivity_cost"]["check"]["pairs"] == 24
    assert -1 <= run["sensitivity_cost"]["check"]["tau"] <= 1


def test_device_arguments():
    import argparse

    from mpq.cli import _devices, _one_device

    assert _devices(argparse.Namespace(device="cpu")) == ["cpu"]  # a run directory saved before --device repeated
    assert _devices(argparse.Namespace(device=None)) == ["cpu"]
    assert _devices(argparse.Namespace(device=["cpu", "cuda:h100"])) == ["cpu", "cuda:h100"]
    with pytest.raises(SystemExit, match="one --device at a time"):
        _one_device(argparse.Namespace(device=["cpu", "cuda:h100"], cmd="profile"))


def test_solve_another_budget_on_a_finished_run(cli_run, tmp_path):
    out, _ = cli_run
    proc = mpq_cli("-q", "solve", str(out), "--budget", "size=0.2", "--out", str(tmp_path / "s"))
    assert "chosen:" in proc.stdout and "not measured" in proc.stdout
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run["budget_text"] == "size=0.2" and run["evaluated"] is False
    assert run["summary"][1]["size_mb"] <= run["limits"]["size_mb"] + 1e-12
    assert (tmp_path / "s" / "dashboard.html").exists() and (tmp_path / "s" / "report.md").exists()
    proc = mpq_cli("solve", str(out), "--budget", "size=0.2", "--solver", "greedy", "--solver-options",
                   '{"secondary": "latency_ms"}', check=False)
    assert proc.returncode == 2 and "does not honour secondary" in proc.stderr


def test_help_lists_every_command_and_defaults_come_from_the_options():
    from mpq.options import ProfileOptions, SolveOptions

    top = mpq_cli("--help").stdout
    assert all(c in top for c in ("search", "solve", "profile", "apply", "dashboard", "sensitivity-report"))
    search = " ".join(mpq_cli("search", "--help").stdout.split())
    assert f"(default {SolveOptions().frontier_points})" in search and f"(default {ProfileOptions().repeats})" in search
    from mpq.solvers import available_solvers

    assert "{" + ",".join(available_solvers()) + "}" in search  # choices read from the registry
