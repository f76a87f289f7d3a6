"""mpq.search end to end on both reference models (in-process profiling), the run directory, resume, apply."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil

import pandas as pd
import pytest
import torch

import mpq
from mpq.artifacts import read_run

from conftest import between_fastest_and_float
from mpq.config import BitConfig

QUICK = dict(profile="inprocess", repeats=5, warmup=1, frontier_points=5, progress=False)


@pytest.fixture(scope="module")
def digits_run(digits_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-run")
    before = {k: v.clone() for k, v in digits_task.model.state_dict().items()}
    result = mpq.search(digits_task.model, digits_task.calib, digits_task.eval_fn, budget="size=0.3", out=out,
                        metric="top1", model_name="digits-cnn", **QUICK)
    return result, out, before


def resumable_copy(out, tmp_path):
    """The run directory copied, so that a resume writes there and the shared run stays as the search left it."""
    return shutil.copytree(out, tmp_path / "run")


def assert_same_choice(first, again, budget: str, config: BitConfig, chosen: BitConfig) -> None:
    """A resumed study chooses what the first one chose. The untied optimum depends on the scores only; the
    tie-break among allocations within tie_tolerance of it goes to the fastest, and rows that the first run
    measured under load are measured again on resume, so it may move only when the latency table did. (The solver's
    own choice: the measured uniform check runs only in a live study, and ``first`` is a loaded one.)"""
    untied = again.solve(budget, tie_tolerance=0, check_uniform=False)
    assert untied.config == first.solve(budget, tie_tolerance=0).config
    if again.table["latency_ms"].equals(first.table["latency_ms"]):
        assert config == chosen
    else:
        tied = again.solve(budget, check_uniform=False)
        tol = again.options.solve.tie_tolerance
        assert tied.row("chosen")["score"] <= untied.row("chosen")["score"] + tol + 1e-9


def test_search_leaves_model_alone(digits_run, digits_task):
    _, _, before = digits_run
    assert all(torch.equal(before[k], v) for k, v in digits_task.model.state_dict().items())
    assert type(digits_task.model.conv1) is torch.nn.Conv2d


def test_budget_met_and_result_shape(digits_run):
    result, _, _ = digits_run
    limit = result.info["limits"]["size_mb"]
    assert limit == pytest.approx(0.3 * result.info["reference"]["size_mb"])
    chosen = result.row("chosen")
    assert chosen["size_mb"] <= limit + 1e-12
    assert set(result.summary["name"]) == {"float", "chosen", "uniform_int8", "uniform_int4"}
    assert isinstance(result.config, BitConfig) and set(result.config.layers) == set(result.layers["layer"])
    m = result.measured
    assert m["latency_ms"] > 0 and m["latency_predicted_ms"] > 0 and 0.9 <= m["metric"] <= 1.0
    # the real-kernel metric is the fake-quant one up to a couple of images
    assert abs(m["metric"] - m["metric_fakequant"]) <= 2 / 360 + 1e-9
    # uniform INT4 is smaller than uniform INT8, which is smaller than float
    s = result.summary.set_index("name")["size_mb"]
    assert s["uniform_int4"] < s["uniform_int8"] < s["float"]


def test_frontier(digits_run):
    result, _, _ = digits_run
    f = result.frontier
    assert len(f) >= 3 and {"swept", "score", "size_mb", "latency_ms", "metric", "chosen", "choice"} <= set(f)
    for swept, part in f.groupby("swept"):
        part = part.sort_values(swept)
        assert part["score"].is_monotonic_decreasing
    assert f["metric"].notna().all()


def test_run_directory(digits_run):
    result, out, _ = digits_run
    for name in ("config.json", "run.json", "summary.csv", "layers.csv", "frontier.csv", "costs.csv", "scores.csv",
                 "latency.csv", "kept_float.csv", "report.md", "dashboard.html"):
        assert (out / name).exists(), name
    assert BitConfig.load(out / "config.json") == result.config
    run = read_run(out)
    assert run["summary_table"].set_index("name").loc["chosen", "latency_measured_ms"] == pytest.approx(
        result.measured["latency_ms"])
    report = (out / "report.md").read_text()
    assert "latency predicted (ms)" in report and "latency measured (ms)" in report
    assert "top1 fake-quant" in report and "top1 real kernels" in report
    chosen_line = next(l for l in report.splitlines() if l.startswith("| **chosen"))
    assert f"{result.measured['latency_ms']:.4g}" in chosen_line


def test_dashboard_holds_the_data(digits_run):
    result, out, _ = digits_run
    html = (out / "dashboard.html").read_text()
    # plotly.js is embedded (no <script src=...>), so the page works offline
    assert re.findall(r"<script[^>]*\ssrc=", html) == [] and len(html) > 1_000_000
    from mpq.dashboards import figures_in

    figs = figures_in(html)
    lines = [t for t in figs["frontier"]["data"] if t.get("mode") == "lines+markers"]
    f = result.frontier
    by_name = {t["name"]: t for t in lines}
    assert sorted(by_name["frontier (latency_ms)"]["x"]) == pytest.approx(sorted(f.loc[f.swept == "latency_ms",
                                                                                        "latency_ms"]))
    bars = figs["bits"]["data"][0]
    assert list(bars["y"]) == list(result.layers["layer"]) and list(bars["text"]) == list(result.layers["option"])


def test_study_solves_other_budgets_from_the_run(digits_run):
    """The search's run directory holds its study: any budget solves from it without the model, in seconds; the
    search's own budget gives the search's own config, and every exact frontier point is the optimum at its cost."""
    result, out, _ = digits_run
    study = mpq.load_study(out)
    again = study.solve("size=0.3")
    assert again.config == result.config and math.isnan(again.measured["latency_ms"])
    for budget in ("size=0.25", "size=0.5", "bops_ratio=0.2"):
        r = study.solve(budget)
        for col, lim in r.info["limits"].items():
            if not math.isinf(lim):
                assert r.row("chosen")[{"size_mb": "size_mb", "bops": "bops", "latency_ms":
                                        "latency_predicted_ms"}[col]] <= lim * (1 + 1e-9)
    front = study.frontier("size_mb")
    for point in front.itertuples():
        r = study.solve(f"size_mb={point.size_mb * (1 + 1e-9)!r}", tie_tolerance=0)
        assert r.row("chosen")["score"] == pytest.approx(point.score, rel=1e-6, abs=1e-12)
    with pytest.raises(mpq.ConfigError, match="needs the model"):
        study.solve("size=0.3", evaluate=True)


def test_resume_study_from_its_record(digits_task, digits_run, tmp_path):
    """The options a study was made with are its resume record: resume_study runs it again with them."""
    result, out, _ = digits_run
    study = mpq.resume_study(resumable_copy(out, tmp_path), digits_task.model, digits_task.calib,
                             digits_task.eval_fn)
    assert study.options.solve.frontier_points == QUICK["frontier_points"]
    assert study.options.profile.repeats == QUICK["repeats"] and study.options.evaluate.metric == "top1"
    assert study.sensitivity.cost.get("reused") is True
    assert_same_choice(mpq.load_study(out), study, "size=0.3", study.solve("size=0.3").config, result.config)


def test_resume_reuses_sensitivity(digits_task, digits_run, tmp_path):
    result, out, _ = digits_run
    again_out = resumable_copy(out, tmp_path)
    again = mpq.search(digits_task.model, digits_task.calib, digits_task.eval_fn, budget="size=0.3", out=again_out,
                       metric="top1", **QUICK)
    assert again.sensitivity.cost.get("reused") is True
    prof = again.info["profile"]
    # every workload came from the profile cache, but for rows the first run measured under load (untrusted, they
    # are measured again once the machine is quiet) or taken while it ran slower (stale)
    assert prof["measured"] == prof["remeasured_untrusted"] + prof["remeasured_stale"], prof
    assert prof["remeasured_untrusted"] <= result.info["profile"]["untrusted_rows"]
    pd.testing.assert_frame_equal(again.sensitivity.scores, result.sensitivity.scores, check_exact=False)
    assert_same_choice(mpq.load_study(out), mpq.load_study(again_out), "size=0.3", again.config, result.config)


def test_apply_chosen_config(digits_run, digits_task):
    result, out, _ = digits_run
    model = mpq.apply(copy.deepcopy(digits_task.model), out / "config.json", calib_data=digits_task.calib)
    quantized = {n for n, b in result.config.layers.items() if not b.is_float}
    for name in quantized:
        assert not isinstance(model.get_submodule(name), (torch.nn.Conv2d, torch.nn.Linear))
    assert digits_task.eval_fn(model) == pytest.approx(result.measured["metric"])


@pytest.fixture(scope="module")
def lm_study(lm_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-study")
    # profiled at 2 sequences (256 rows), not the calibration batch's 16: the same behaviour, an eighth of the time
    return mpq.study(lm_task.model, lm_task.calib[:2], lm_task.eval_fn, out=out, metric="perplexity",
                     higher_is_better=False, batch_size=2, **QUICK), out


def test_char_lm_latency_budget(lm_study, tmp_path):
    study, _ = lm_study
    limit = between_fastest_and_float(study)
    result = study.solve(f"latency_ms={limit!r}", evaluate=True, out=tmp_path)
    chosen = result.row("chosen")
    assert result.info["limits"]["latency_ms"] == pytest.approx(limit)
    # verified before choosing: the returned config is the one verification returned, measured within the budget
    v = result.info["verification"]
    returned = next(r for r in v["rows"] if r["name"] == v["returned"])
    assert returned["choice"] == chosen["choice"] and v["predictor"] == result.info["latency_model"]["name"]
    if v["swapped_from"] is None:  # the solver's own choice: within the limit by the table's sum
        assert chosen["latency_additive_ms"] <= limit + 1e-9
    if v["met"]:
        assert returned["fits"] and returned["measured_ms"] <= limit * 1.05
    else:  # nothing measured within the limit (a busy machine): said so, with the fastest measured
        assert "NOT met" in v["describe"] and v["fastest"][1] > limit
    assert result.info["kept_float"] == 4 * 2 + 1  # layer norms and the final norm (embeddings are quantizable)
    ppl_float = result.row("float")["metric_real"]
    assert 2.0 < ppl_float < 5.0
    assert chosen["metric_real"] == pytest.approx(chosen["metric_fakequant"], rel=0.02)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["higher_is_better"] is False and run["metric"] == "perplexity"


def test_study_latency_phases(lm_study):
    """latency_ms@B, decode and prefill limits: each phase profiled at its own shape, its own cost column, met."""
    study, _ = lm_study
    study.limits("latency_ms@1=1e9,decode=1,prefill_ms@32=1e9")  # measures the three phases
    for column in ("latency_ms@1", "decode_ms@1", "prefill_ms@32"):
        assert column in study.table.columns and (study.table[column] > 0).all()
    phases = study.costs.phases
    assert phases["decode_ms@1"]["input"] == [1, 1] and phases["prefill_ms@32"]["input"] == [1, 32]
    assert phases["latency_ms@1"]["input"][0] == 1
    limit = between_fastest_and_float(study, "decode_ms@1")
    # at least as large as the fastest decode allocation (where float decodes fastest, the limit admits only it)
    fastest = study.table.loc[study.table.groupby("layer")["decode_ms@1"].idxmin()]
    size = max(0.6, float(fastest["size_mb"].sum() + study.costs.fixed["size_mb"]) / study.costs.reference["size_mb"]
               * (1 + 1e-6))
    result = study.solve(f"decode_ms={limit!r},size={size!r}")
    totals = result.summary.set_index("name").loc["chosen"]
    assert totals["decode_ms@1_predicted"] <= limit + 1e-9
    assert totals["size_mb"] <= size * study.costs.reference["size_mb"] + 1e-12
    front = study.frontier("decode_ms@1")
    assert front["decode_ms@1"].is_monotonic_increasing or front.sort_values("decode_ms@1")["score"] \
        .is_monotonic_decreasing
    assert set(result.frontier["swept"]) >= {"size_mb", "latency_ms", "decode_ms@1"}


def test_search_restores_training_mode_and_needs_no_eval_fn(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 8)).train()
    calib = [torch.randn(16, 32) for _ in range(2)]  # no targets: the float model's predictions are the labels
    result = mpq.search(model, calib, budget="size=0.5", **QUICK)
    assert model.training and model[2].training
    assert result.row("chosen")["size_mb"] <= 0.5 * result.info["reference"]["size_mb"] + 1e-12
    assert math.isnan(result.measured["metric"])


@pytest.mark.parametrize("solver", ["pareto", "greedy", "optuna"])
def test_search_with_each_solver(solver, digits_task, tmp_path):
    opts = {"n_trials": 30} if solver == "optuna" else {}
    result = mpq.search(digits_task.model, digits_task.calib[:2], digits_task.eval_fn, budget="size=0.3",
                        solver=solver, solver_options=opts, out=tmp_path, **{**QUICK, "frontier_points": 4})
    assert result.info["solver"].startswith(solver)
    assert result.row("chosen")["size_mb"] <= result.info["limits"]["size_mb"] + 1e-12
    assert set(result.frontier["swept"]) >= {"size_mb", "latency_ms"}
    if solver == "optuna":
        assert (tmp_path / "optuna.sqlite").exists()
        assert (result.frontier["swept"] == result.info["solver"]).any()


def test_search_objective_over_decoupled_metrics(digits_task):
    result = mpq.search(digits_task.model, digits_task.calib[:2], budget="size=0.3", sensitivity="decoupled",
                        sensitivity_options={"backend": "inprocess"},
                        solver_options={"objective": {"score_kl": 1.0, "score_loss": 1.0},
                                        "caps": {"score_feature": 0.5}},
                        **{k: v for k, v in QUICK.items() if k != "sensitivity_options"})
    assert {"score_kl", "score_loss", "score_feature"} <= set(result.table.columns)
    picked = result.table.set_index(["layer", "option"]).loc[[(l, b.name) for l, b in result.config.layers.items()]]
    assert picked["score_feature"].sum() <= 0.5 + 1e-9


def test_char_lm_pareto_solver(lm_task, tmp_path):
    result = mpq.search(lm_task.model, lm_task.calib[:1], lm_task.eval_fn, budget="size=0.3", solver="pareto",
                        out=tmp_path, metric="perplexity", higher_is_better=False, batch_size=2, **QUICK)
    assert result.info["solver"].startswith("pareto")
    assert (result.frontier["swept"] == result.info["solver"]).any()
    assert result.row("chosen")["size_mb"] <= result.info["limits"]["size_mb"] + 1e-12
