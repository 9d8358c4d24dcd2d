"""The search-space schema: shipped files validate; bad keys, ranges and values are one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from panacea_platform.config import ConfigError, load_config
from panacea_platform.search.space import (
    SearchSpaceError,
    canonical_path,
    check_against_job,
    check_space,
    check_trial_scaling,
    config_with,
    load_space,
    space_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


def check(tree: dict) -> None:
    check_space(space_from_dict(tree))


def test_the_two_required_spaces_are_shipped():
    assert {p.name for p in SHIPPED} >= {"offline_default.yaml", "paper_neighbourhood.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_space_validates_against_its_base_job(path, monkeypatch):
    monkeypatch.chdir(REPO)  # base_job paths are relative to the repository
    space = load_space(path)
    assert space.base_job is not None and (REPO / space.base_job).is_file()
    check_against_job(space, load_config(space.base_job))


# The authors' default of each baseline's hyperparameters (../shared/defences.md), at its grid's centre.
AUTHORS_DEFAULTS = {
    "vaccine": {"vaccine.rho": 2.0},
    "repnoise": {"repnoise.alpha": 0.1, "repnoise.beta": 1e-3},
    "booster": {"booster.lambda": 5.0, "booster.alpha": 0.1},
    "lisa": {"lisa.rho": 1.0},
    "antidote": {"antidote.prune_ratio": 0.1},
}


@pytest.mark.parametrize("defence", sorted(AUTHORS_DEFAULTS))
def test_each_baseline_has_a_space_centred_on_its_authors_defaults(defence, monkeypatch):
    monkeypatch.chdir(REPO)
    space = load_space(REPO / "search_spaces" / f"{defence}.yaml")
    assert space.fixed["defence"] == defence
    for key, value in AUTHORS_DEFAULTS[defence].items():
        grid = sorted(space.parameters[key].values)
        assert grid[len(grid) // 2] == value, key


def test_the_paper_space_fits_every_paper_job(monkeypatch):
    monkeypatch.chdir(REPO)
    space = load_space(REPO / "search_spaces" / "paper_neighbourhood.yaml")
    # The authors' values sit in the middle of the grids.
    assert 1.0 in space.parameters["panacea.rho"].values and 1e-3 in space.parameters["panacea.lambda"].values
    for job in sorted((REPO / "jobs" / "paper").glob("*.yaml")):
        check_against_job(space, load_config(job))


@pytest.mark.parametrize(
    "tree, message",
    [
        (
            {"parameters": {"panacea.lambda": {"uniform": [-1, 1]}}},
            "parameters.panacea.lambda: lower bound -1 is below the field's minimum 0",
        ),
        (
            {"parameters": {"data.harmful_ratio": {"uniform": [0.1, 1.5]}}},
            "parameters.data.harmful_ratio: upper bound 1.5 is above the field's maximum 1",
        ),
        (
            {"parameters": {"optim.lr": {"uniform": [0, 1e-3]}}},
            "parameters.optim.lr: lower bound 0 must be above the field's exclusive minimum 0",
        ),
        ({"parameters": {"panacea.rho": {"loguniform": [0, 1]}}}, "loguniform [0.0, 1.0]: lo must be > 0"),
        ({"parameters": {"panacea.rho": {"uniform": [2, 1]}}}, "uniform [2.0, 1.0]: lo must be below hi"),
        ({"parameters": {"panacea.rho": {"grid": []}}}, "grid is empty"),
        ({"parameters": {"panacea.rho": {"grid": [1], "choice": [2]}}}, "give exactly one of grid, choice"),
        (
            {"parameters": {"panacea.rhoo": {"grid": [1]}}},
            "parameters.panacea.rhoo: 'panacea.rhoo' is not a config field",
        ),
        ({"parameters": {"panacea": {"grid": [1]}}}, "parameters.panacea: is a whole section"),
        ({"parameters": {"output_dir": {"grid": ["x"]}}}, "parameters.output_dir: set by the sweep"),
        ({"parameters": {"optim.max_steps": {"uniform": [1, 9]}}}, "uniform draws real numbers but the field takes"),
        ({"parameters": {"optim.max_steps": {"grid": [-1, 3]}}}, "value -1 is out of range (the field needs >= 0)"),
        ({"parameters": {"optim.schedule": {"choice": ["constant", "warp"]}}}, "value 'warp' is not allowed"),
        ({"parameters": {}}, "parameters"),
        ({"parameters": {"panacea.rho": {"grid": [1]}}, "schedular": {"type": "asha"}}, "schedular: unknown key"),
        ({"parameters": {"panacea.rho": {"grid": [1]}}, "scheduler": {"type": "hyperband"}}, "scheduler.type"),
        (
            {"parameters": {"panacea.rho": {"grid": [1]}}, "searcher": "annealing"},
            "searcher 'annealing': expected one of",
        ),
        (
            {"parameters": {"panacea.rho": {"choice": [1]}}, "searcher": "grid"},
            "searcher 'grid' needs every parameter as grid",
        ),
        (
            {"parameters": {"panacea.rho": {"grid": [1]}}, "fixed": {"panacea.rho": 2}},
            "both searched (parameters) and fixed",
        ),
        (
            {"parameters": {"panacea.rho": {"grid": [1]}}, "fixed": {"evaluation.threshold": 2}},
            "fixed.evaluation.threshold: value 2",
        ),
        ({"parameters": {"panacea.rho": {"grid": [1]}}, "mode": "down"}, "mode"),
        (
            {"parameters": {"panacea.rho": {"grid": [1]}}, "fixed": {"evaluation.suites": ["no_such_preset"]}},
            "fixed.evaluation.suites: evaluation.suites: no preset 'no_such_preset'",
        ),
        (
            {
                "parameters": {"panacea.rho": {"grid": [1]}},
                "objectives": [{"metric": f"m{i}", "mode": "min"} for i in range(4)],
            },
            "objectives",
        ),
    ],
)
def test_a_bad_space_is_one_clear_config_error(tree, message):
    with pytest.raises(SearchSpaceError) as info:
        check(tree)
    assert message in str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)


def test_a_searcher_that_is_not_installed_names_its_pip_package():
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(SearchSpaceError, match="needs the package 'optuna'.*pip install optuna"):
            check({"parameters": {"panacea.rho": {"choice": [0.1, 1.0]}}, "searcher": "optuna"})
    else:
        check({"parameters": {"panacea.rho": {"choice": [0.1, 1.0]}}, "searcher": "optuna"})


def test_lambda_is_reachable_by_alias_and_by_name():
    assert canonical_path("panacea.lambda") == canonical_path("panacea.lam") == "panacea.lambda"
    base = load_config(None)
    assert config_with(base, {"panacea.lambda": 0.25}).panacea.lam == 0.25
    assert config_with(base, {"panacea.lam": 0.5}).panacea.lam == 0.5


def test_a_trials_workers_have_one_home_the_configs_scaling():
    base = load_config(None)  # scaling.zero_stage null: one process
    space = space_from_dict(
        {
            "parameters": {"panacea.rho": {"grid": [0.5, 1.0]}},
            "fixed": {"scaling.num_workers": 2, "scaling.zero_stage": 2},
        }
    )
    check_against_job(space, base)
    check_trial_scaling(space, base)
    assert space.resources.trial_cpus == 0.05
    with pytest.raises(SearchSpaceError, match=r"scaling.zero_stage = None: a sweep's trials train on Ray Train"):
        check_trial_scaling(space_from_dict({"parameters": {"panacea.rho": {"grid": [0.5, 1.0]}}}), base)
    # The old copy in resources: names the field to set instead.
    with pytest.raises(
        SearchSpaceError,
        match=r"resources.*num_workers: a trial's workers are the job's scaling "
        r"section; set scaling.num_workers under fixed:",
    ):
        space_from_dict({"parameters": {"panacea.rho": {"grid": [0.5]}}, "resources": {"num_workers": 2}})
    with pytest.raises(SearchSpaceError, match=r"set scaling.use_gpu under fixed:"):
        space_from_dict({"parameters": {"panacea.rho": {"grid": [0.5]}}, "resources": {"gpus_per_worker": 1}})
    # Sampling the workers per trial stays refused: every trial scales alike.
    with pytest.raises(SearchSpaceError, match=r"parameters.scaling.num_workers: .*set it under fixed:"):
        check_space(space_from_dict({"parameters": {"scaling.num_workers": {"grid": [1, 2]}}}))


def test_values_are_checked_against_the_base_job_too(tmp_path):
    base = load_config(None)
    # 16 accumulation steps is a valid field value, but the base job's batch of 8 cannot fill them.
    space = space_from_dict(
        {
            "parameters": {"optim.grad_accum_steps": {"grid": [1, 16]}},
            "fixed": {"scaling.num_workers": 2, "scaling.zero_stage": 0},
        }
    )
    with pytest.raises(
        SearchSpaceError, match=r"parameters.optim.grad_accum_steps = 16 with the base job: .*cannot be filled"
    ):
        check_against_job(space, base)
    # 0 steps is a valid field value, but only for a defence that releases an existing adapter.
    zero_steps = space_from_dict({"parameters": {"optim.max_steps": {"grid": [0, 3]}}})
    with pytest.raises(SearchSpaceError, match=r"parameters.optim.max_steps = 0 with the base job: .*model.adapter"):
        check_against_job(zero_steps, base)


def test_objectives_must_name_a_suite_and_rate_the_trials_report():
    base = load_config(None)
    two = [{"metric": "eval/harmful/harmful_score", "mode": "min"}, {"metric": "eval/task/accuracy", "mode": "max"}]
    helpful = {"metric": "eval/helpfulness/answered_rate", "mode": "max"}
    tree = {"parameters": {"panacea.rho": {"grid": [1]}}, "objectives": [*two, helpful]}
    # The default job's suites have no helpfulness suite: every trial would miss the third objective.
    with pytest.raises(
        SearchSpaceError,
        match=r"objectives\[2\].metric 'eval/helpfulness/answered_rate': no suite "
        r"'helpfulness' in the job's evaluation.suites",
    ):
        check_against_job(space_from_dict(tree), base)
    check_against_job(
        space_from_dict({**tree, "fixed": {"evaluation.suites": ["harmful", "helpfulness", "task"]}}), base
    )
    wrong_rate = {**tree, "objectives": [two[0], {"metric": "eval/task/answered_rat", "mode": "max"}]}
    with pytest.raises(SearchSpaceError, match=r"suite 'task' \(accuracy\) reports no 'answered_rat'; it reports"):
        check_against_job(space_from_dict(wrong_rate), base)
    with_interval = {**tree, "objectives": [two[0], {"metric": "eval/task/accuracy_ci_low", "mode": "max"}]}
    check_against_job(space_from_dict(with_interval), base)


def test_asha_on_a_held_out_signal_needs_eval_every():
    base = load_config(None)
    tree = {"parameters": {"panacea.rho": {"grid": [1]}}, "scheduler": {"type": "asha"}}
    with pytest.raises(SearchSpaceError, match="set eval_every: N"):
        check_against_job(space_from_dict(tree), base)
    check_against_job(space_from_dict({**tree, "eval_every": 2}), base)


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(SearchSpaceError, match="not found"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(["a", "b"]))
    with pytest.raises(SearchSpaceError, match="top level must be a mapping"):
        load_space(bad)


def test_the_fingerprint_changes_with_the_space():
    a = space_from_dict({"parameters": {"panacea.rho": {"grid": [1]}}})
    b = space_from_dict({"parameters": {"panacea.rho": {"grid": [2]}}})
    assert a.fingerprint() == space_from_dict({"parameters": {"panacea.rho": {"grid": [1]}}}).fingerprint()
    assert a.fingerprint() != b.fingerprint()


STUDY_SPACE = {
    "parameters": {
        "defence": {"grid": ["sft", "panacea"]},
        "data.harmful_ratio": {"grid": [0.0, 0.1, 0.2]},
        "panacea.rho": {"choice": [0.1, 1.0]},
    },
    "searcher": "random",
    "study": {"rows": "defence", "columns": "data.harmful_ratio", "reference": "sft", "max_trials": 6},
}


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"rows": "seed"}, "study.rows = 'seed': expected one of the space's grid parameters"),
        ({"columns": "panacea.rho"}, "study.columns = 'panacea.rho': expected one of the space's grid parameters"),
        ({"columns": "defence"}, "study.columns = 'defence': the same field as study.rows"),
        ({"reference": "vaccine"}, "study.reference = 'vaccine': expected one of defence's values ['sft', 'panacea']"),
        ({"max_trials": 5}, "study.max_trials = 5: the grid makes 6 trials (num_samples 1 x 2 x 3)"),
        ({"rows": "defence", "colour": "red"}, "study.colour: unknown key"),
    ],
)
def test_a_study_that_cannot_print_its_table_is_one_clear_error(change, fragment):
    check(STUDY_SPACE)  # as given, it can
    with pytest.raises(SearchSpaceError) as info:
        check({**STUDY_SPACE, "study": {**STUDY_SPACE["study"], **change}})
    assert fragment in str(info.value)


def test_a_study_reads_the_evaluation_and_the_shipped_studies_fit_their_jobs(monkeypatch):
    with pytest.raises(SearchSpaceError, match="set evaluate: true"):
        check({**STUDY_SPACE, "evaluate": False})
    monkeypatch.chdir(REPO)
    nowhere = space_from_dict(
        {
            **STUDY_SPACE,
            "study": {**STUDY_SPACE["study"], "headlines": [{"title": "X %", "suite": "nowhere", "rate": "accuracy"}]},
        }
    )
    with pytest.raises(SearchSpaceError, match=r"study.headlines\[0\] 'eval/nowhere/accuracy'"):
        check_against_job(nowhere, load_config("jobs/offline_default.yaml"))
    monkeypatch.chdir(REPO)
    for name, grid in (("offline_study_p", (3, 3)), ("paper_table1_p", (7, 4)), ("paper_table2_n", (7, 5))):
        space = load_space(REPO / "search_spaces" / f"{name}.yaml")
        rows, columns = space.parameters[space.study.rows].values, space.parameters[space.study.columns].values
        assert (len(rows), len(columns)) == grid and space.study.max_trials == grid[0] * grid[1], name
        check_against_job(space, load_config(space.base_job))
    table1 = load_space(REPO / "search_spaces" / "paper_table1_p.yaml")
    assert table1.parameters["data.harmful_ratio"].values == [0.0, 0.05, 0.1, 0.2] and table1.study.reference == "sft"
