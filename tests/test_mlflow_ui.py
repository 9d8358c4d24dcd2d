"""The MLflow UI opens on the result, checked in a real browser (headless Chromium, Debian's package,
driven by Playwright) against a live `mlflow server`.

The runs are logged by the platform's own code: Tracker (the experiment marked as model training),
record_run (each run's description), the main job's headline metrics and the evaluation's answers
table. Where no browser can be installed the test skips with the reason (the summary shows it).
"""

import shutil

import pytest

from conftest import free_port

pytestmark = pytest.mark.slow


def _browser_path() -> str:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "Playwright is not installed (the test extra: pip install -e '.[test]')"
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if reason is None and path is None:
        reason = "no Chromium (scripts/setup.sh installs Debian's chromium when run as root)"
    if reason is not None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    from panacea_platform.team_server.mlflow_server import start_mlflow_server, stop_process
    from panacea_platform.tracking import seed_new_sqlite_store

    root = tmp_path_factory.mktemp("mlflow-ui")
    store = f"sqlite:///{root / 'mlflow.db'}"
    seed_new_sqlite_store(store)  # a migrated store: the server starts without migrating one
    process = start_mlflow_server(
        store, root / "artifacts", free_port(), log=root / "server.log", timeout_s=300, workers=1
    )
    yield f"http://127.0.0.1:{process.args[process.args.index('--port') + 1]}"
    stop_process(process)


def _log_main_job(url: str, config) -> tuple[str, str, dict[str, str]]:
    """A parent run and two methods' child runs, as the main job logs them: (experiment id, parent id,
    method -> child run id)."""
    from panacea_platform.recipes.main_job import paper_columns
    from panacea_platform.run_notes import answers_rows, headline_metrics
    from panacea_platform.tracking import Tracker
    from panacea_platform.training.loop import record_run

    evaluations = {
        "sft": {"eval/harmful/harmful_score": 0.325, "eval/task/accuracy": 0.99},
        "panacea": {"eval/harmful/harmful_score": 0.2, "eval/task/accuracy": 0.97},
    }
    children = {}
    with Tracker(url, "ui-check", "main-job-ui") as parent:
        parent.describe("**Main job**: placeholder report")
        for method, evaluation in evaluations.items():
            from panacea_platform.config import with_changes

            child_config = with_changes(config, {"defence": method, "run_name": f"ui-{method}-s0"})
            with Tracker(url, "ui-check", child_config.run_name, parent_run_id=parent.run_id) as child:
                record_run(child_config, "finetune", {}, child)
                child.log_metrics(evaluation)
                child.log_metrics(headline_metrics(paper_columns(child_config), evaluation))
                child.log_table(
                    answers_rows(
                        [
                            {
                                "suite": "harmful",
                                "prompt": "placeholder prompt one",
                                "answer": "placeholder answer",
                                "flagged": False,
                            }
                        ]
                    ),
                    "eval/eval-adapter/answers.json",
                )
                children[method] = child.run_id
    return parent.experiment_id, parent.run_id, children


def test_the_runs_page_shows_the_methods_and_their_headlines_side_by_side(ui_server, tiny_run_config):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    from panacea_platform.tracking import runs_page

    chromium = _browser_path()
    experiment_id, parent_id, children = _log_main_job(ui_server, tiny_run_config())
    tags = MlflowClient(ui_server).get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1800, "height": 1000})
        # The link the main job prints opens the runs page, not the GenAI overview.
        page.goto(runs_page(ui_server, experiment_id), wait_until="load")
        page.get_by_text("main-job-ui").first.wait_for(timeout=60_000)
        assert page.title().startswith("Runs")
        page.locator("[data-component-id$='runnamecellrenderer.tsx_46']").first.click()  # the parent's children
        page.get_by_text("ui-panacea-s0").first.wait_for(timeout=20_000)
        # One step puts the headlines side by side: Columns, type "headline", tick the group.
        page.get_by_test_id("column-selection-dropdown").first.click()
        page.keyboard.type("headline")
        page.get_by_text("Metrics (2)").click()
        page.keyboard.press("Escape")
        page.get_by_role("columnheader", name="headline.HS").first.wait_for(timeout=20_000)
        headers = {h.inner_text() for h in page.locator("[role=columnheader]").all()}
        assert {"headline.HS", "headline.FA"} <= headers
        rows = " ".join(page.locator("[role=row]").all_inner_texts())
        assert "0.325" in rows and "0.97" in rows

        # A method's run page says what it is.
        page.goto(f"{ui_server}/#/experiments/{experiment_id}/runs/{children['panacea']}", wait_until="load")
        page.get_by_text("Fine-tuning under panacea").first.wait_for(timeout=60_000)
        # Its answers are a table the UI shows.
        page.goto(
            f"{ui_server}/#/experiments/{experiment_id}/runs/{children['panacea']}/artifacts/"
            "eval/eval-adapter/answers.json",
            wait_until="load",
        )
        page.get_by_text("placeholder prompt one").first.wait_for(timeout=60_000)
        browser.close()
