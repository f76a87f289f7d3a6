"""Bad input, probed as a new user and an adversary would: every probe gets a clear error of the right class that
names the layer, the value and what is allowed, raised before the first expensive stage (an estimator that raises
if it is ever called proves it), and nothing of the user's is lost or silently wrong.

Each probe runs through the API and, where the command line takes the input, through ``mpq`` too."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mpq
from conftest import NEEDS_LOWBIT
from mpq.calib import CalibrationSet
from mpq.cli import main
from mpq.errors import (BudgetError, CalibrationError, ConfigError, ModelError, NoQuantizableLayersError,
                        RunDirectoryError)
from mpq.plugins import ESTIMATORS
from mpq.sensitivity import SensitivityEstimator

FAST = dict(profile="inprocess", repeats=2, warmup=1, frontier_points=3, progress=False)


class EstimatorCalled(AssertionError):
    pass


@pytest.fixture(scope="module", autouse=True)
def raising_estimator():
    """``sensitivity="raises_if_called"``: any probe that reaches the estimator fails loudly."""
    class RaisesIfCalled(SensitivityEstimator):
        name = "raises_if_called"

        def estimate(self, *args, **kwargs):
            raise EstimatorCalled("the estimator ran: the bad input was not caught before the expensive stages")

    ESTIMATORS.add(RaisesIfCalled.name, RaisesIfCalled)
    yield
    ESTIMATORS.remove(RaisesIfCalled.name)


NO_ESTIMATOR = dict(FAST, sensitivity="raises_if_called")


def _search(task, budget="size=0.5", calib=None, model=None, **kw):
    return mpq.search(model if model is not None else task.model, calib if calib is not None else task.calib,
                      budget=budget, **{**NO_ESTIMATOR, **kw})


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(["-q", *map(str, args)])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------------------------------------
MALFORMED = [("size", "not key=value"), ("size=abc", "not a number"), ("size=-1", "positive"),
             ("speed=2", "unknown budget keys"), ("size=0.3,size=0.5", "'size' given twice"),
             ("latency_ms@x=1", "unknown budget keys"), ("latency_ms@4=0", "positive")]


@pytest.mark.parametrize("budget, words", MALFORMED)
def test_malformed_budget(budget, words, digits_task, capsys, tmp_path):
    with pytest.raises(BudgetError, match=words):
        _search(digits_task, budget)
    rc, err = _cli(capsys, "search", "--model", "digits-cnn", "--budget", budget, "--out", tmp_path / "r")
    assert rc == 2 and words in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("budget, column", [("size_mb=0.01", "size_mb"), ("bops=1e3", "bops")])
def test_unreachable_size_or_bops_fails_before_profiling_and_scoring(budget, column, digits_task, monkeypatch):
    import mpq.workers

    def no_profiling(*a, **k):
        raise AssertionError("profiled although the size/BOPs budget was already known to be unreachable")

    monkeypatch.setattr(mpq.workers, "profile_workloads", no_profiling)
    with pytest.raises(BudgetError) as e:
        _search(digits_task, budget)
    assert f"{column} <=" in str(e.value) and "smallest reachable" in str(e.value)
    assert e.value.smallest[column] > 0 and f"{e.value.smallest[column]:.6g}" in str(e.value)


def _reference_names():
    from mpq.models import reference_names

    return reference_names()


@pytest.mark.parametrize("name", _reference_names())
def test_infeasible_budget_fails_before_any_estimator_on_every_bundled_model(name, monkeypatch):
    """Done-when of issue 17, by behaviour: an impossible size budget is refused with neither the profiler nor the
    estimator (which raises if called) having run."""
    import mpq.workers
    from mpq.models import load_reference

    monkeypatch.setattr(mpq.workers, "profile_workloads",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("profiled")))
    task = load_reference(name)
    with pytest.raises(BudgetError, match=r"size_mb <= 1e-06 MB is below the smallest reachable"):
        mpq.search(task.model, task.calib, task.eval_fn, budget="size_mb=1e-6", **NO_ESTIMATOR)


def test_unreachable_latency_fails_after_profiling_before_scoring(digits_task):
    with pytest.raises(BudgetError, match=r"latency_ms <= 1e-06 ms is below the smallest latency measured end to "
                                          r"end, [0-9.]+ ms .*the profile table's sum says [0-9.]+ ms") as e:
        _search(digits_task, "latency_ms=1e-6")
    assert e.value.smallest["latency_ms"] > 1e-6  # the measured floor


def test_unreachable_phase_latency(digits_task):
    with pytest.raises(BudgetError, match=r"latency_ms@1 <= 1e-06"):
        _search(digits_task, "latency_ms@1=1e-6")
    with pytest.raises(BudgetError, match="for language models: it needs token-id inputs"):
        _search(digits_task, "decode=0.5")


def test_budget_needed(digits_task):
    with pytest.raises(ConfigError, match="needs a budget"):
        _search(digits_task, {})


# --------------------------------------------------------------------------------------------------------------------
# the model and its calibration data
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_named_by_their_layer(value, digits_task):
    model = copy.deepcopy(digits_task.model)
    with torch.no_grad():
        model.fc2.weight[3, 7] = value
    with pytest.raises(ModelError) as e:
        _search(digits_task, model=model)
    msg = str(e.value)
    assert "'fc2'" in msg and "'weight'" in msg and "(3, 7)" in msg and "conv1" not in msg


def test_model_without_quantizable_layers():
    with pytest.raises(NoQuantizableLayersError) as e:
        mpq.search(nn.Sequential(nn.LayerNorm(4), nn.PReLU()), torch.randn(2, 3, 4), budget="size=0.5",
                   **NO_ESTIMATOR)
    assert "Linear, Conv1d, Conv2d, Embedding" in str(e.value) and "LayerNorm" in str(e.value)


def _labels(n=8):
    return torch.zeros(n, dtype=torch.long)


CALIBRATION = [
    ("empty list", [], "empty"),
    ("no data", None, "no calibration data"),
    ("zero rows", [(torch.randn(0, 1, 8, 8), _labels(0))], "is empty"),
    ("NaN inputs", [(torch.full((8, 1, 8, 8), float("nan")), _labels())], "NaN/Inf"),
    ("wrong channels", [(torch.randn(8, 3, 8, 8), _labels())],
     "layer 'conv1' (Conv2d) got tensor of shape (8, 3, 8, 8)"),
    ("wrong spatial size", [(torch.randn(8, 1, 16, 16), _labels())], "layer 'fc1' (Linear)"),
    ("float64 inputs", [(torch.randn(8, 1, 8, 8, dtype=torch.float64), _labels())], "torch.float64"),
    ("label out of range", [(torch.randn(8, 1, 8, 8), torch.full((8,), 10))], "class id 10, outside [0, 10)"),
    ("negative label", [(torch.randn(8, 1, 8, 8), torch.full((8,), -1))], "class id -1"),
    ("label count", [(torch.randn(8, 1, 8, 8), _labels(5))], "hold 5 ids"),
    ("bool labels", [(torch.randn(8, 1, 8, 8), torch.ones(8, dtype=torch.bool))], "dtype torch.bool"),
    ("float labels", [(torch.randn(8, 1, 8, 8), torch.rand(8))], "float targets"),
    ("string batches", ["abc", "def"], "hold no tensor"),
    ("inconsistent batches", [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 9, 9)], "batch 1"),
]


@pytest.mark.parametrize("what, calib, words", CALIBRATION, ids=[c[0] for c in CALIBRATION])
def test_bad_calibration_data(what, calib, words, digits_task):
    with pytest.raises(CalibrationError) as e:
        mpq.search(digits_task.model, calib, budget="size=0.5", **NO_ESTIMATOR)
    assert words in str(e.value), str(e.value)


def test_calibration_errors_name_the_failing_layer_not_the_first():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(12, 4))  # the second Linear cannot take 16
    with pytest.raises(CalibrationError) as e:
        CalibrationSet.from_any(torch.randn(5, 8)).check(model)
    msg = str(e.value)
    assert "layer '2' (Linear) got tensor of shape (5, 16)" in msg and "last dimension of 12" in msg


# --------------------------------------------------------------------------------------------------------------------
# names and options: all refused before anything runs
# --------------------------------------------------------------------------------------------------------------------
NAMES = [
    (dict(sensitivity="magic"), "unknown sensitivity estimator 'magic'; available: "),
    (dict(sensitivity="0.7*hessian+"), "has an empty term"),
    (dict(sensitivity="hessian+hessian"), "appears twice"),
    (dict(solver="magic"), "unknown solver 'magic'; available: "),
    (dict(profile="magic"), "profile='magic' not supported: use one of ray, inprocess"),
    (dict(quantizer="magic"), "magic"),
    (dict(solver="optuna", solver_options={"n_trial": 3}), "solver 'optuna' has no option 'n_trial'; its options: "
                                                            "n_trials"),
    (dict(solver="greedy", solver_options={"secondary": "latency_ms"}), "solver 'greedy' does not honour secondary"),
    (dict(sensitivity="hessian", sensitivity_options={"max_probe": 3}), "has no option 'max_probe'"),
    (dict(quantizer="gptq", quantizer_options={"dampp": 0.1}), "quantizer 'gptq' has no option 'dampp'"),
    pytest.param(dict(allowed=["w3a16"]), "'w3a16': no cpu kernel runs it for any layer of this model (did you mean "
                 "w3a16asym, w3a16g128asym, w3a16g128sym, w3a16g32asym, w3a16g64asym, w3a16sym?); the options there "
                 "are: float, w8a16, w8a16asym, w8a8,", marks=NEEDS_LOWBIT),
    (dict(allowed=["w9a8"]), "weight bits 9 not allowed"),
    (dict(device="tpu"), "device 'tpu' not supported"),
    (dict(repeats=0), "repeats=0 must be a whole number >= 1"),
    (dict(tie_tolerance=-1), "tie_tolerance=-1"),
    (dict(no_such_option=1), "unknown option 'no_such_option'; options: "),
]


@pytest.mark.parametrize("options, words", NAMES, ids=[str(getattr(n, "values", n)[0]) for n in NAMES])
def test_unknown_names_and_options(options, words, digits_task):
    kw = {**NO_ESTIMATOR, **options}
    with pytest.raises(ConfigError) as e:
        mpq.search(digits_task.model, digits_task.calib, budget="size=0.5", **kw)
    assert words in str(e.value), str(e.value)


def test_unknown_names_through_the_cli(capsys, tmp_path):
    rc, err = _cli(capsys, "search", "--model", "digits-cnn", "--budget", "size=0.5", "--out", tmp_path / "r",
                   "--sensitivity", "0.7*hessian+")
    assert rc == 2 and "has an empty term" in err
    rc, err = _cli(capsys, "search", "--model", "digits-cnn", "--budget", "size=0.5", "--out", tmp_path / "r",
                   "--allowed", "w3a16", "--sensitivity", "raises_if_called", "--profile", "inprocess")
    assert rc == 2 and "'w3a16': no cpu kernel runs it" in err
    with pytest.raises(SystemExit):
        main(["search", "--solver", "magic"])  # argparse: the choices come from the solver registry
    assert "invalid choice: 'magic'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# broken config files
# --------------------------------------------------------------------------------------------------------------------
def _planted_pickle(path, marker):
    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Planted()))


CONFIGS = [
    ("non-UTF-8 bytes", b"\xff\xfe\x00garbage", "not UTF-8 text"),
    ("layer null", json.dumps({"format": "mpq.bitconfig", "version": 3, "layers": {"fc1": None}}).encode(),
     "layer 'fc1': bits are null"),
    ("top-level list", b"[1, 2, 3]", "a bit config is a JSON object"),
    ("not JSON", b"{layers: ", "not valid JSON"),
    ("other format", json.dumps({"format": "x"}).encode(), "not an mpq bit config"),
    ("bad bits", json.dumps({"format": "mpq.bitconfig", "version": 3, "layers": {"fc1": "w9a8"}}).encode(),
     "weight bits 9"),
]


@pytest.mark.parametrize("what, content, words", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_broken_config_files(what, content, words, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        mpq.BitConfig.load(path)
    assert words in str(e.value) and str(path) in str(e.value)
    rc, err = _cli(capsys, "apply", "--model", "digits-cnn", "--config", path)
    assert rc == 2 and words in err


def test_missing_and_planted_config(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no bit config at"):
        mpq.BitConfig.load(tmp_path / "nope.json")
    marker = tmp_path / "pwned"
    _planted_pickle(tmp_path / "config.json", marker)
    with pytest.raises(ConfigError):
        mpq.BitConfig.load(tmp_path / "config.json")
    assert not marker.exists()


def test_load_quantized_mismatch_leaves_the_model_alone(digits_task, tmp_path):
    model = copy.deepcopy(digits_task.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = mpq.BitConfig({"fc1": "w8a8", "conv2": "w8a8"})
    torch.save({"fc1.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="the model was not changed"):
        mpq.load_quantized(model, config, tmp_path / "bad.pt")
    assert type(model.fc1) is nn.Linear and type(model.conv2) is nn.Conv2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    marker = tmp_path / "pwned"
    _planted_pickle(tmp_path / "planted.pt", marker)
    with pytest.raises(ConfigError, match="weights_only=True"):
        mpq.load_quantized(model, config, tmp_path / "planted.pt")
    assert not marker.exists() and type(model.fc1) is nn.Linear
    # and the right state dict still loads
    good = mpq.apply(copy.deepcopy(digits_task.model), config).state_dict()
    mpq.load_quantized(model, config, good)
    assert type(model.fc1) is not nn.Linear


# --------------------------------------------------------------------------------------------------------------------
# run directories
# --------------------------------------------------------------------------------------------------------------------
def test_out_refuses_a_users_directory(digits_task, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    for i in range(8):
        (user / f"notes{i}.txt").write_text(f"precious {i}")
    with pytest.raises(RunDirectoryError, match="8 entries that are not an mpq run .*--force"):
        _search(digits_task, out=user)
    rc, err = _cli(capsys, "search", "--model", "digits-cnn", "--budget", "size=0.5", "--out", user)
    assert rc == 2 and "not an mpq run" in err
    # with force the guard lets it through (here to a budget error, before anything is written over)
    with pytest.raises(BudgetError):
        _search(digits_task, "size_mb=0.001", out=user, force=True)
    assert sorted(p.name for p in user.iterdir())[:8] == [f"notes{i}.txt" for i in range(8)]
    assert all((user / f"notes{i}.txt").read_text() == f"precious {i}" for i in range(8))
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file"):
        _search(digits_task, out=tmp_path / "file")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    out = tmp_path_factory.mktemp("bad-run") / "run"
    mpq.search(model, [torch.randn(8, 32)], budget="size=0.5", out=out, **{**FAST, "sensitivity": "entropy"})
    return out


@pytest.mark.parametrize("name", ["run.json", "summary.csv", "frontier.csv", "study.json", "scores.csv",
                                  "sensitivity.json"])
def test_binary_file_in_a_run_directory(name, tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    _planted_pickle(run / name, marker)
    readers = [lambda: mpq.load_study(run)] if name in ("study.json", "scores.csv", "sensitivity.json") else \
        [lambda: __import__("mpq.artifacts").artifacts.read_run(run)]
    for read in readers:
        with pytest.raises(RunDirectoryError) as e:
            read()
        assert name in str(e.value)
    command = ["solve", run, "--budget", "size=0.6"] if name in ("study.json", "scores.csv", "sensitivity.json") \
        else ["report", run]
    rc, err = _cli(capsys, *command)
    assert rc == 2 and name in err
    assert not marker.exists()


def test_damaged_search_args_on_resume(tmp_path, capsys):
    (tmp_path / "search_args.json").write_bytes(b"\x80\x81garbage")
    rc, err = _cli(capsys, "search", "--resume", tmp_path)
    assert rc == 2 and "search_args.json is not text" in err


# --------------------------------------------------------------------------------------------------------------------
# studies of the Optuna solver
# --------------------------------------------------------------------------------------------------------------------
def _optuna_table():
    rng = np.random.default_rng(3)
    return pd.DataFrame([{"layer": f"l{l}", "option": o, "score": 0.0 if o == "float" else float(rng.uniform(0, 1)),
                          "size_mb": {"float": 4.0, "w8a8": 1.0, "w4a16g32": 0.6}[o], "latency_ms": 1.0}
                         for l in range(5) for o in ("float", "w8a8", "w4a16g32")])


def test_garbage_optuna_study_is_named(tmp_path):
    pytest.importorskip("optuna")
    from mpq.solvers import optuna_allocate

    (tmp_path / "optuna.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="optuna.sqlite cannot be opened .* move it away"):
        optuna_allocate(_optuna_table(), {"size_mb": 10.0}, n_trials=5, storage=tmp_path / "optuna.sqlite")


def test_optuna_reopened_with_a_tighter_budget_stays_within_it(tmp_path):
    pytest.importorskip("optuna")
    from mpq.solvers import optuna_allocate

    storage, table = tmp_path / "optuna.sqlite", _optuna_table()
    loose = optuna_allocate(table, {"size_mb": 15.0}, n_trials=40, storage=storage)
    tight = optuna_allocate(table, {"size_mb": 4.5}, n_trials=40, storage=storage)
    assert tight.costs["size_mb"] <= 4.5 + 1e-9 and tight.stats["study"] != loose.stats["study"]
    assert not tight.stats["resumed"]  # the loose study's trials were not counted as this one's
    again = optuna_allocate(table, {"size_mb": 4.5}, n_trials=40, storage=storage)
    assert again.stats["resumed"] and again.stats["new_trials"] == 0 and again.choice == tight.choice


def test_optuna_through_a_study_at_two_budgets(tiny_run, tmp_path):
    pytest.importorskip("optuna")
    study = mpq.load_study(tiny_run)
    out = tmp_path / "o"
    loose = study.solve("size=0.9", solver="optuna", solver_options={"n_trials": 30}, out=out)
    tight = study.solve("size=0.4", solver="optuna", solver_options={"n_trials": 30}, out=out)
    for r in (loose, tight):
        assert r.row("chosen")["size_mb"] <= r.info["limits"]["size_mb"] + 1e-12
    assert (out / "optuna.sqlite").exists()


# --------------------------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------------------------
def test_resume_refuses_flags_that_change_the_study_and_applies_the_others(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny_task.py").write_text(
        "import torch\nfrom types import SimpleNamespace\n"
        "def task():\n    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))\n"
        "    x = torch.randn(8, 32)\n"
        "    return SimpleNamespace(name='tiny', model=m, calib=[x], eval_fn=lambda mm: float(mm(x).sum()),\n"
        "                           metric='sum', higher_is_better=True)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    base = ["search", "--model", "tiny_task:task", "--out", run, "--profile", "inprocess", "--repeats", "2",
            "--frontier-points", "3", "--sensitivity", "entropy"]
    assert _cli(capsys, *base, "--budget", "size=0.6")[0] == 0
    rc, err = _cli(capsys, "search", "--resume", run, "--sensitivity", "hessian")
    assert rc == 2 and "--sensitivity (saved: 'entropy', given: 'hessian')" in err
    assert _cli(capsys, "search", "--resume", run, "--budget", "size=0.4")[0] == 0
    info = json.loads((run / "run.json").read_text())
    assert info["budget_text"] == "size=0.4" and info["sensitivity_cost"]["reused"] is True
    assert info["summary"][1]["size_mb"] <= info["limits"]["size_mb"] + 1e-12
    # issue 21 item 1 through the command line: an Optuna run resumed with a tighter budget stays within it
    pytest.importorskip("optuna")
    assert _cli(capsys, "search", "--resume", run, "--solver", "optuna", "--solver-options", '{"n_trials": 25}',
                "--budget", "size=0.6")[0] == 0
    assert _cli(capsys, "search", "--resume", run, "--budget", "size=0.3")[0] == 0
    info = json.loads((run / "run.json").read_text())
    assert info["solver"].startswith("optuna") and info["budget_text"] == "size=0.3"
    assert info["summary"][1]["size_mb"] <= info["limits"]["size_mb"] + 1e-12
