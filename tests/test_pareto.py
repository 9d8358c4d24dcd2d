"""pareto_front on designed points with known answers (harm down, accuracy up unless stated)."""

from __future__ import annotations

import math

import pytest

from panacea_platform.search.pareto import dominates, pareto_front

HARM_ACC = [("harm", "min"), ("acc", "max")]


def rows(*points):
    return [{"harm": h, "acc": a} for h, a in points]


def test_one_point_is_the_front():
    assert pareto_front(rows((30, 0.5)), HARM_ACC) == [True]


def test_a_dominated_chain_leaves_only_its_best_point():
    # Each point is worse than the one before on both objectives.
    assert pareto_front(rows((10, 0.9), (20, 0.8), (30, 0.7), (40, 0.6)), HARM_ACC) == [True, False, False, False]


def test_a_trade_off_keeps_every_point_and_drops_the_dominated_one():
    # (10, 0.5), (20, 0.7), (30, 0.9) trade harm for accuracy; (25, 0.6) is beaten by (20, 0.7).
    assert pareto_front(rows((10, 0.5), (20, 0.7), (30, 0.9), (25, 0.6)), HARM_ACC) == [True, True, True, False]


def test_duplicates_on_the_front_are_all_kept_and_duplicates_off_it_all_dropped():
    flags = pareto_front(rows((10, 0.8), (10, 0.8), (20, 0.5), (20, 0.5)), HARM_ACC)
    assert flags == [True, True, False, False]


def test_a_tie_on_one_objective_is_decided_by_the_other():
    # Same harm: the higher accuracy dominates; same accuracy: the lower harm dominates.
    assert pareto_front(rows((10, 0.6), (10, 0.8)), HARM_ACC) == [False, True]
    assert pareto_front(rows((15, 0.7), (12, 0.7)), HARM_ACC) == [False, True]


def test_directions_are_honoured():
    points = rows((10, 0.5), (20, 0.9))
    # Both minimised: (10, 0.5) dominates; both maximised: (20, 0.9) dominates.
    assert pareto_front(points, [("harm", "min"), ("acc", "min")]) == [True, False]
    assert pareto_front(points, [("harm", "max"), ("acc", "max")]) == [False, True]


def test_rows_missing_an_objective_are_off_the_front_and_dominate_nothing():
    points = [{"harm": 5.0}, {"harm": 10, "acc": 0.5}, {"harm": math.nan, "acc": 1.0}, {"harm": None, "acc": 2}]
    assert pareto_front(points, HARM_ACC) == [False, True, False, False]


def test_dominates_needs_strictly_better_somewhere():
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 2)) and not dominates((0, 3), (1, 2))


def test_a_bad_mode_is_an_error():
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        pareto_front(rows((1, 1)), [("harm", "down")])


def test_a_third_objective_keeps_a_point_the_first_two_would_drop():
    three = [("harm", "min"), ("acc", "max"), ("answered", "max")]
    points = [
        {"harm": 10, "acc": 0.9, "answered": 20},
        {"harm": 20, "acc": 0.8, "answered": 90},
        {"harm": 30, "acc": 0.7, "answered": 10},
    ]
    assert pareto_front(points, HARM_ACC) == [True, False, False]
    assert pareto_front(points, three) == [True, True, False]


def test_the_pareto_plot_colours_a_third_objective(tmp_path, monkeypatch):
    from panacea_platform.plots import _pyplot
    from panacea_platform.search.report import TrialRow, plot_pareto

    trials = [
        TrialRow(
            f"t{i}",
            f"r{i}",
            "FINISHED",
            {"panacea.rho": rho},
            {"eval/harmful/harmful_score": hs, "eval/task/accuracy": fa, "eval/helpfulness/answered_rate": ans},
            {},
        )
        for i, (rho, hs, fa, ans) in enumerate([(0.1, 10, 90, 20), (0.3, 20, 80, 90), (1.0, 30, 70, 10)])
    ]
    trials[0].metrics.update({"eval/harmful/harmful_score_ci_low": 4.0, "eval/harmful/harmful_score_ci_high": 22.0})
    objectives = [
        ("eval/harmful/harmful_score", "min"),
        ("eval/task/accuracy", "max"),
        ("eval/helpfulness/answered_rate", "max"),
    ]
    front = pareto_front([t.metrics for t in trials], objectives)
    assert front == [True, True, False]
    figures = []  # keep the figure the plot would close, to read what it drew
    monkeypatch.setattr(_pyplot(), "close", figures.append)
    path = plot_pareto(trials, ["panacea.rho"], objectives, front, tmp_path / "pareto.png", "three")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax, colourbar = figures[0].axes
    assert "answered_rate" in colourbar.get_ylabel()
    # One error bar (the trial that logged its interval), the trials coloured by the third objective,
    # and the front's two points ringed but not joined (over three objectives it is no curve here).
    shaded = [c for c in ax.collections if c.get_array() is not None]
    assert list(shaded[0].get_array()) == [20, 90, 10]
    (ring,) = [line for line in ax.lines if line.get_label().startswith("Pareto front")]
    assert list(ring.get_xdata()) == [10, 20] and ring.get_linestyle() == "None"
    assert sum(1 for c in ax.collections if c.get_array() is None) >= 1  # the error bar's segments


def test_the_trials_table_shows_each_rate_with_its_interval():
    from panacea_platform.search.report import TrialRow, format_table

    metrics = {
        "eval/harmful/harmful_score": 30.0,
        "eval/harmful/harmful_score_ci_low": 18.1,
        "eval/harmful/harmful_score_ci_high": 45.4,
        "eval/task/accuracy": 98.0,
        "score": -0.29,
    }
    rows = [TrialRow("t0", "r0", "FINISHED", {"panacea.rho": 0.3}, metrics, {})]
    table = format_table(
        rows, ["panacea.rho"], [("eval/harmful/harmful_score", "min"), ("eval/task/accuracy", "max")], [True]
    )
    line = table.splitlines()[2]
    assert "30.0 [18.1, 45.4]" in line  # the rate with its interval
    assert "98" in line and "98.0 [" not in line  # no interval logged: the value alone


def test_a_searched_values_column_is_as_wide_as_its_name_and_values():
    from panacea_platform.search.report import TrialRow, format_table

    rows = [
        TrialRow("t0", "r0", "FINISHED", {"defence": "random_perturbation", "data.harmful_ratio": 0.1}, {}, {}),
        TrialRow("t1", "r1", "FINISHED", {"defence": "sft", "data.harmful_ratio": 0.2}, {}, {}),
    ]
    table = format_table(rows, ["defence", "data.harmful_ratio"], [("eval/harmful/harmful_score", "min")], [False] * 2)
    header, _, first, second = table.splitlines()[:4]
    assert header.split()[1:3] == ["defence", "harmful_ratio"]  # the names apart, not "defenceharmful_ratio"
    assert first.split()[1:3] == ["random_perturbation", "0.1"] and second.split()[1:3] == ["sft", "0.2"]
    # Right-aligned under their names.
    assert first.index("0.1") + 3 == second.index("0.2") + 3 == header.index("harmful_ratio") + len("harmful_ratio")
