"""The main job's report: which sweeps' trials it draws beside the methods."""

import json

import yaml

from panacea_platform.recipes.main_job import SweepTrial, sweeps_on


def _sweep(root, name, adapter, trials):
    folder = root / "sweeps" / name
    for trial_id, _params, _metrics in trials:
        (folder / "trials" / trial_id).mkdir(parents=True)
        (folder / "trials" / trial_id / "config.yaml").write_text(yaml.safe_dump({"model": {"adapter": str(adapter)}}))
    (folder / "trials.json").write_text(json.dumps([{"trial_id": t, "params": p, "metrics": m} for t, p, m in trials]))
    (folder / "pareto.png").write_bytes(b"\x89PNG")
    return folder


def test_sweeps_on_keeps_evaluated_trials_of_sweeps_on_the_same_aligned_adapter(tmp_path):
    ours, other = tmp_path / "align-a" / "adapter", tmp_path / "align-b" / "adapter"
    same = _sweep(
        tmp_path,
        "rho",
        ours,
        [
            (
                "t0",
                {"panacea.rho": 0.1, "panacea.lambda": 1.0},
                {"eval/harmful/harmful_score": 20.0, "eval/task/accuracy": 90.0},
            ),
            ("t1", {"panacea.rho": 0.3, "panacea.lambda": 1.0}, {"score": 1.5}),  # stopped early: no evaluation
        ],
    )
    _sweep(
        tmp_path,
        "elsewhere",
        other,
        [("t0", {"panacea.rho": 1.0}, {"eval/harmful/harmful_score": 5.0, "eval/task/accuracy": 1.0})],
    )

    trials, plots = sweeps_on(tmp_path, {ours.resolve()})
    assert trials == [SweepTrial("rho", "rho=0.1 lambda=1", 20.0, 90.0)]
    assert plots == [same / "pareto.png"]
    # Trials are read on the suites the methods are plotted on: another harm suite, another point.
    assert sweeps_on(tmp_path, {ours.resolve()}, harm="harmbench") == ([], [same / "pareto.png"])
    assert sweeps_on(tmp_path, set()) == ([], [])
    assert sweeps_on(tmp_path / "nothing-here", {ours.resolve()}) == ([], [])


def test_the_aligned_evaluation_is_reused_across_n_and_p_but_not_across_prompts(tiny_run_config):
    from panacea_platform.recipes.main_job import aligned_evaluation_key

    config = tiny_run_config()
    key = aligned_evaluation_key(config)
    # The attack's size and ratio move no evaluation prompt (fixed pools): the cached evaluation stands.
    assert aligned_evaluation_key(tiny_run_config(data={"n": config.data.n * 2, "harmful_ratio": 0.2})) == key
    # Fewer held-out harmful prompts, or another generation setting, is another evaluation.
    fewer = tiny_run_config(data={"eval_harmful_size": config.data.eval_harmful_size - 1})
    assert aligned_evaluation_key(fewer) != key
    assert aligned_evaluation_key(tiny_run_config(evaluation={"max_new_tokens": 5})) != key


def test_an_edited_prompt_file_is_evaluated_anew(tiny_llama, tmp_path):
    from conftest import tiny_config, write_jsonl
    from panacea_platform.recipes.main_job import aligned_evaluation_key

    rows = [{"prompt": f"placeholder harmful question {i}", "answer": "placeholder answer"} for i in range(120)]
    harmful = write_jsonl(tmp_path / "harmful.jsonl", rows)
    key = aligned_evaluation_key(tiny_config(tiny_llama, harmful, tmp_path / "runs"))
    write_jsonl(harmful, [{**r, "prompt": r["prompt"] + " (edited)"} for r in rows])  # same path, same settings
    assert aligned_evaluation_key(tiny_config(tiny_llama, harmful, tmp_path / "runs")) != key
