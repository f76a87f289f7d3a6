"""Latency in the study pipeline (issue 18): the latency predictor chosen by held-out error on configs timed end to
end, verify-before-choosing in ``Study.solve``, and the deployment mode in the record, run.json and the report."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mpq
from mpq.config import Choice
from mpq.cost_stage import MAIN
from mpq.evaluate_stage import candidates_of
from mpq.solvers.predictors import LATENCY_PREDICTORS
from mpq.study_verify import config_timer
from mpq.workers import ModeMismatchError

QUICK = dict(profile="inprocess", repeats=5, warmup=1, frontier_points=4, progress=False)


@pytest.fixture(scope="module")
def mlp():
    """An MLP at batch 256: on the CPU kernels its uniform INT4 (w4a16, dequantized per call) runs several times
    slower than uniform INT8 (w8a8), a gap wide enough to survive a shared machine."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10)).eval()
    return model, [torch.randn(256, 512) for _ in range(2)]


def test_predictor_chosen_by_held_out_error_and_named_in_the_report(mlp, tmp_path):
    model, calib = mlp
    study = mpq.study(model, calib, out=tmp_path / "study", latency_configs=6, **QUICK)
    result = study.solve("size=0.5", out=tmp_path / "run")
    lm = result.info["latency_model"]
    assert lm["name"] in LATENCY_PREDICTORS and lm["selected"]
    assert set(lm["scores"]) >= {"additive", "additive+affine", "table+correction"}
    assert all(v["n"] == 6 and v["median_pct"] >= 0 for v in lm["scores"].values())
    best = min(v["median_pct"] for v in lm["scores"].values())
    assert lm["scores"][lm["name"]]["median_pct"] <= best + 0.5 + 1e-9  # the best, or a simpler one within margin
    # the frontier and the summary carry the chosen predictor's latency, the table's sum beside it
    assert result.frontier["latency_predicted_ms"].map(math.isfinite).all()
    s = result.summary.set_index("name")
    assert (s["latency_predicted_ms"] > 0).all() and (s["latency_additive_ms"] > 0).all()
    assert s.loc["uniform_int4", "bits_per_weight"] < s.loc["uniform_int8", "bits_per_weight"] < 32
    assert s.loc["float", "bits_per_weight"] == 32 and s.loc["uniform_int4", "bits_per_weight_nominal"] == 4
    assert "verification" not in result.info  # size is exact: nothing to verify
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["mode"] == "eager" and run["target_spec"] == "cpu" and run["latency_model"]["name"] == lm["name"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"latency predictor: {lm['name']}" in report and "deployment mode: eager" in report
    assert "bits/weight" in report and "none needed" in report

    # read back from disk: the same predictor, fit again on the configs the study measured; nothing to verify with
    loaded = mpq.load_study(tmp_path / "study")
    assert loaded.latency_model().name == lm["name"]
    keys = list(result.frontier["choice"].head(3))
    again = loaded.latency_model().predict(loaded.table, [Choice.from_key(k) for k in keys])
    assert again == pytest.approx(list(result.frontier["latency_predicted_ms"].head(3)), rel=1e-6)
    res = loaded.solve(f"latency_ms={2 * study.costs.reference[MAIN]!r}")
    assert res.info["verification"]["met"] is None and "loaded from disk" in res.info["verification"]["describe"]


def test_a_study_whose_tables_were_measured_in_another_mode_is_refused(mlp, tmp_path):
    model, calib = mlp
    mpq.study(model, calib, out=tmp_path, latency_configs=0, **QUICK)
    meta = json.loads((tmp_path / "study.json").read_text())
    assert meta["mode"] == "eager" and meta["profile"][MAIN]["fingerprint"]["mode"] == "eager"
    meta["options"]["space"]["device"] = "cpu+compile"  # the target now deploys compiled
    (tmp_path / "study.json").write_text(json.dumps(meta))
    with pytest.raises(ModeMismatchError, match=r"measured in mode 'eager' but its target 'cpu\+compile'"):
        mpq.load_study(tmp_path)


def test_solve_returns_the_measured_winner_where_the_table_ranks_wrongly(mlp, tmp_path):
    model, calib = mlp
    study = mpq.study(model, calib, latency_configs=0, **QUICK)
    options = study.record.options_per_layer()
    base = candidates_of(options, Choice({layer: "float" for layer in options}))
    int8, int4 = dict(base["uniform_int8"]), dict(base["uniform_int4"])
    rows = config_timer(study)([int8, int4])  # real, cached: verification reads the same rows
    fast_ms, slow_ms = rows[0]["median_ms"], rows[1]["median_ms"]
    assert slow_ms > 2 * fast_ms, f"uniform INT4 {slow_ms:.3g} ms vs INT8 {fast_ms:.3g} ms: no gap to test with"
    budget = math.sqrt(fast_ms * slow_ms)
    # the table claims uniform INT4 is the fastest config and does no damage: the solver must pick it
    costs = study.costs.table
    is_int4 = [int4[layer] == o for layer, o in zip(costs["layer"], costs["option"])]
    costs.loc[is_int4, MAIN] = 1e-6
    costs.loc[costs["option"] == "float", MAIN] = 1e3
    study.costs.fixed[MAIN] = 0.0
    study.record.merge()
    study.record.table.loc[is_int4, "score"] = 0.0
    study._frontiers.clear()
    result = study.solve(f"latency_ms={budget!r}", out=tmp_path, check_uniform=False)  # the rigged choice stays
    v = result.info["verification"]
    solver_row = next(r for r in v["rows"] if r["name"] == "chosen")
    seen = [(r["name"], r["measured_ms"], r["q1_ms"], r["q3_ms"]) for r in v["rows"]]
    assert solver_row["choice"] == Choice(int4).key and not solver_row["fits"], (budget, fast_ms, slow_ms, seen)
    assert solver_row["measured_ms"] > budget and solver_row["predicted_ms"] < budget
    assert v["met"] and v["swapped_from"] == "chosen" and v["returned"] != "chosen"
    won = next(r for r in v["rows"] if r["name"] == v["returned"])
    assert won["fits"] and won["measured_ms"] <= budget * 1.05
    assert result.row("chosen")["choice"] == won["choice"] != Choice(int4).key
    assert result.row("chosen")["latency_measured_ms"] == pytest.approx(won["measured_ms"])
    report = (tmp_path / "report.md").read_text()
    assert "swapped from the solver's choice because" in report and "over the budget" in report


def test_a_latency_below_the_tables_floor_is_judged_by_measurement(mlp):
    """The table's sum is a prediction: where it says a latency cannot be reached, the fastest configs are timed
    end to end; a limit they meet is solved (and verified), one below them names the measured floor."""
    model, calib = mlp
    study = mpq.study(model, calib, latency_configs=0, **QUICK)
    options = study.record.options_per_layer()
    int8 = dict(candidates_of(options, Choice({layer: "float" for layer in options}))["uniform_int8"])
    fast_ms = config_timer(study)([int8])[0]["median_ms"]
    floor0 = study.costs.fixed[MAIN] + study.costs.table.groupby("layer")[MAIN].min().sum()
    factor = max(10.0, 10 * fast_ms / floor0)  # a table that overestimates every layer (and the rest) that much
    study.costs.table[MAIN] *= factor
    study.costs.fixed[MAIN] *= factor
    study.record.merge()
    study._frontiers.clear()
    table_floor = study.costs.fixed[MAIN] + study.costs.table.groupby("layer")[MAIN].min().sum()
    budget = 3 * fast_ms  # wide: the test may share the machine
    assert table_floor > budget, (table_floor, fast_ms)
    result = study.solve(f"latency_ms={budget!r}")
    v = result.info["verification"]
    assert v["met"], v["describe"]
    won = next(r for r in v["rows"] if r["name"] == v["returned"])
    assert won["measured_ms"] <= budget * 1.05
    with pytest.raises(mpq.BudgetError, match="smallest latency measured end to end") as e:
        study.solve(f"latency_ms={0.01 * fast_ms!r}")
    floor = e.value.smallest[MAIN]
    assert 0.01 * fast_ms < floor < table_floor  # the measured floor, not the table's
    assert f"the profile table's sum says {table_floor:.6g}" in str(e.value)


def test_a_uniform_config_that_measures_less_damage_replaces_the_solvers_choice(mlp, monkeypatch):
    """check_uniform: the solver's choice and the fitting uniform configs of least predicted damage are measured
    on the calibration split (here a stub that ranks them); the least measured damage is returned, within the
    budget, and the numbers are kept in the solver's stats."""
    model, calib = mlp
    study = mpq.study(model, calib, latency_configs=0, **QUICK)
    seen: list[list[dict]] = []

    def damage(configs):
        seen.append(configs)
        # the solver's choice (first) measures worst; among uniform configs the one with most 8-bit layers wins
        return [1.0] + [0.5 - 0.1 * sum(o.startswith("w8") for o in c.values()) for c in configs[1:]]

    monkeypatch.setattr(study.live, "damage", damage)
    limit = 0.5 * study.costs.reference["size_mb"]
    result = study.solve(f"size_mb={limit!r}")
    stats = result.info["solver_stats"]
    uniform = seen[-1][1:]
    assert uniform and len(uniform) <= 4 and all(len(set(c.values()) - {"float"}) == 1 for c in uniform)
    assert stats["uniform_swap"].startswith("uniform-") and stats["uniform_check"]["chosen"] == 1.0
    best = min(uniform, key=lambda c: 0.5 - 0.1 * sum(o.startswith("w8") for o in c.values()))
    assert result.row("chosen")["choice"] == Choice(best).key
    assert result.row("chosen")["size_mb"] <= limit + 1e-9
    # the solver's choice measuring least keeps it; with check_uniform=False nothing is measured
    monkeypatch.setattr(study.live, "damage", lambda configs: [0.0] + [1.0] * (len(configs) - 1))
    kept = study.solve(f"size_mb={limit!r}")
    assert "uniform_swap" not in kept.info["solver_stats"] and kept.info["solver_stats"]["uniform_check"]
    seen.clear()
    monkeypatch.setattr(study.live, "damage", damage)
    plain = study.solve(f"size_mb={limit!r}", check_uniform=False)
    assert not seen and "uniform_check" not in plain.info["solver_stats"]


def test_a_phase_limit_is_verified_at_its_own_input_and_solved_again_when_its_table_errs(mlp, monkeypatch):
    """A phase's limit (here ``latency_ms@128``; decode and prefill alike) is measured at the phase's input, not
    trusted to its table. The timer below is a stand-in that measures a fixed multiple of the table's sum: the solver's
    choice then measures over the limit, the limit is scaled by table/measured and solved again, and what comes
    back is the optimum of the honest problem."""
    import mpq.study_verify as sv

    model, calib = mlp
    study = mpq.study(model, calib, latency_configs=0, tie_tolerance=0, **QUICK)  # the least damage, not a tie
    col = "latency_ms@128"
    study.limits(f"{col}=1e9")  # profiles the phase
    assert study.costs.phases[col]["input"][0] == 128
    timed: dict[str, list] = {}

    # the multiple: the least-damage frontier config's table latency is the limit, and that over the multiple falls
    # between the two fastest frontier points (so the honest problem is feasible and its answer is the fastest)
    front = sorted(study.frontier(col)[col].astype(float))
    limit = front[-1]
    factor = limit / ((front[0] + front[1]) / 2)

    def scaled_table(column):
        def measure(choices):
            timed.setdefault(column, []).extend(choices)
            ms = [factor * sv.config_totals(study.table, study.costs.fixed, c, [column])[column] for c in choices]
            return [{"median_ms": m, "q1_ms": m, "q3_ms": m, "trusted": 1} for m in ms]
        return measure

    monkeypatch.setattr(sv, "config_timer", lambda s, column=MAIN: scaled_table(column))
    result = study.solve(f"{col}={limit!r}", check_uniform=False)
    v = result.info["verification"]
    assert set(timed) == {col} and v["budgets"] == {col: pytest.approx(limit)}  # no main limit: only the phase
    solver_row = next(r for r in v["rows"] if r["name"] == "chosen")
    assert not solver_row["fits"] and solver_row["columns"][col]["measured_ms"] > limit
    first = v["resolved"][0]
    measured, table_ms = solver_row["columns"][col]["measured_ms"], solver_row["columns"][col]["predicted_ms"]
    assert first["limits"][col] == pytest.approx(limit * table_ms / measured) == pytest.approx(limit / factor)
    assert v["met"] and v["returned"] != "chosen"
    won = next(r for r in v["rows"] if r["name"] == v["returned"])
    assert won["fits"] and won["columns"][col]["measured_ms"] <= limit * (1 + 1e-9)
    assert won["damage"] == min(r["damage"] for r in v["rows"] if r["fits"])
    honest = study.solve(f"{col}={limit / factor!r}", check_uniform=False, verify=False)
    assert won["damage"] == pytest.approx(honest.row("chosen")["score"], rel=1e-9, abs=1e-12)
    assert result.row("chosen")["choice"] == won["choice"]
    assert math.isnan(result.row("chosen")["latency_measured_ms"])  # a phase's timing is not the main column's
    # rounds=0 (no re-solve): only the first candidates, and the least-damage one that fits among them
    kept, record = sv.verify(study, study.record.allocate(study.limits(f"{col}={limit!r}"), study.options.solve,
                                                           None), study.limits(f"{col}={limit!r}"),
                             study.frontier(_with_phases=[col]), study.latency_model(), rounds=0)
    assert not record["resolved"] and all(not r["name"].startswith("resolved") for r in record["rows"])
