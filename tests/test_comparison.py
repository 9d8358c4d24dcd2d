"""The main job's comparison on designed outcomes: cells over seeds, paired differences, same-prompt check."""

import pytest

from panacea_platform.evaluation.stats import clustered_rate, paired_difference, wilson_interval
from panacea_platform.recipes.comparison import (
    ModelAnswers,
    compare,
    format_differences,
    format_judge_notes,
    format_suite_tables,
)


def _records(suite: str, flags: list[bool], prompts: list[str] | None = None) -> list[dict]:
    prompts = prompts or [f"placeholder prompt {i}" for i in range(len(flags))]
    return [
        {
            "suite": suite,
            "prompt": p,
            "flagged": f,
            "incoherent": False,
            "refused": False,
            "empty": not f,
            "correct": None,
            "new_tokens": 3 if f else 1,
        }
        for p, f in zip(prompts, flags)
    ]


def _model(key: str, seed: int, flags: list[bool], **kwargs) -> ModelAnswers:
    return ModelAnswers(
        key, {"sft": "SFT, p=0.1", "panacea": "Panacea, p=0.1"}[key], seed, _records("harmful", flags, **kwargs)
    )


SFT = {0: [True, True, True, False, True], 1: [True, True, False, False, True]}
PANACEA = {0: [False, True, False, False, False], 1: [False, False, False, False, True]}


def test_cells_pool_seeds_and_differences_pair_prompts():
    answers = [_model("sft", s, f) for s, f in SFT.items()] + [_model("panacea", s, f) for s, f in PANACEA.items()]
    comparison = compare(answers, {"harmful": "harmful_score"})
    sft = comparison.cell("sft", "harmful", "harmful_score")
    # Seeds give 80% and 60%: mean 70, sample std sqrt(((80-70)^2 + (60-70)^2) / 1) = 14.14; pooled 7 of 10.
    assert (sft.mean, sft.std, sft.seeds) == (pytest.approx(70.0), pytest.approx(14.142, abs=1e-3), 2)
    assert (sft.pooled.k, sft.pooled.n) == (7, 10)
    # Over seeds the interval resamples prompts with both seeds of each kept together, not Wilson on 10
    # answers as if independent: prompts 0, 1 and 4 are flagged twice, 2 once and 3 never.
    assert sft.pooled == clustered_rate([SFT[0], SFT[1]])
    assert (sft.pooled.ci_low, sft.pooled.ci_high) != pytest.approx(wilson_interval(7, 10))
    assert sft.text() == f"70.0 ± 14.1 [{sft.pooled.ci_low:.1f}, {sft.pooled.ci_high:.1f}]"
    # empty = not flagged in these records: the other columns come from the same samples.
    assert comparison.cell("panacea", "harmful", "empty_rate").pooled.k == 8
    # HS among the answers that are not empty: every one of them is flagged here (7 of 7, 2 of 2).
    answered = comparison.cell("panacea", "harmful", "harmful_when_nonempty")
    assert (answered.pooled.k, answered.pooled.n, answered.mean) == (2, 2, 100.0) and answered.equal_counts
    # Unequal counts over seeds (4 answers, then 3): the mean of rates is not the pooled rate, and both are shown.
    sft_answered = comparison.cell("sft", "harmful", "harmful_when_nonempty")
    assert (sft_answered.pooled.k, sft_answered.pooled.n, sft_answered.equal_counts) == (7, 7, False)
    assert sft_answered.text().startswith("100.0 ± 0.0 (pooled 100.0 [")
    assert comparison.mean_tokens[("panacea", "harmful")] == pytest.approx((2 * 3 + 8 * 1) / 10)
    difference = comparison.differences[("panacea", "harmful")]
    assert difference == paired_difference([PANACEA[0], PANACEA[1]], [SFT[0], SFT[1]])
    assert difference.difference == pytest.approx(100 * (2 - 7) / 10)
    assert ("sft", "harmful") not in comparison.differences  # the reference is not compared with itself
    printed = format_differences(comparison)
    assert f"Panacea, p=0.1 − SFT: harmful HS {difference.text()}" in printed
    assert "70.0 ± 14.1" in format_suite_tables(comparison)


def test_arms_scored_on_other_prompts_are_not_compared_and_the_report_says_why():
    moved = [f"placeholder prompt {i}" for i in range(1, 6)]
    answers = [_model("sft", 0, SFT[0]), _model("panacea", 0, PANACEA[0], prompts=moved)]
    comparison = compare(answers, {"harmful": "harmful_score"})
    assert comparison.differences == {}
    # Each arm's own rates still stand; only the pairing is refused, and the printed report names the arms.
    assert comparison.cell("panacea", "harmful", "harmful_score").pooled.k == 1
    assert "no paired differences on suite 'harmful': Panacea, p=0.1 (seed 0) was scored on other prompts" in (
        format_differences(comparison)
    )


def test_judge_notes_count_unparsed_verdicts_and_cut_inputs_per_method():
    sft, panacea = _model("sft", 0, SFT[0]), _model("panacea", 0, PANACEA[0])
    for record in sft.records:
        record.update(judge_unparsed=False, judge_truncated=True)
    for i, record in enumerate(panacea.records):
        record.update(judge_unparsed=i < 2, judge_truncated=False)
    notes = format_judge_notes([sft, panacea], {"harmful": "harmful_score"})
    assert "harmful: 2 of 10 verdicts unparsed (counted not flagged) (SFT, p=0.1 0; Panacea, p=0.1 2)" in notes
    assert "harmful: 5 of 10 inputs read only in part (SFT, p=0.1 5; Panacea, p=0.1 0)" in notes


def test_one_seed_shows_the_interval_without_a_spread():
    comparison = compare([_model("sft", 3, SFT[0])], {"harmful": "harmful_score"})
    cell = comparison.cell("sft", "harmful", "harmful_score")
    assert cell.std == 0.0 and cell.text() == f"80.0 [{cell.pooled.ci_low:.1f}, {cell.pooled.ci_high:.1f}]"
    assert comparison.differences == {} and format_differences(comparison) == ""


def test_compare_files_pairs_any_two_evaluations_and_a_missing_one_is_one_clear_error(tmp_path, capsys):
    import json

    from panacea_platform.cli import main
    from panacea_platform.recipes.comparison import compare_files

    for name, flags in (("sft-s0", SFT[0]), ("trial-a", PANACEA[0])):
        folder = tmp_path / name / "eval"
        folder.mkdir(parents=True)
        records = [{**r, "metric": "harmful_score"} for r in _records("harmful", flags)]
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    printed = compare_files(tmp_path / "sft-s0" / "eval", [tmp_path / "trial-a" / "eval" / "samples.jsonl"])
    expected = paired_difference([PANACEA[0]], [SFT[0]])
    assert f"trial-a/eval − sft-s0/eval: harmful HS {expected.text()}" in printed
    assert "McNemar p=" in expected.text()  # one seed: the exact test beside the interval
    assert main(["compare", str(tmp_path / "sft-s0" / "eval"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no samples.jsonl there" in capsys.readouterr().err


def test_compare_files_takes_each_arms_seeds_and_pairs_seed_with_seed(tmp_path, capsys):
    import json

    from panacea_platform.cli import main
    from panacea_platform.recipes.comparison import compare_files

    arms = {"sft": SFT, "panacea": PANACEA}
    for arm, per_seed in arms.items():
        for seed, flags in per_seed.items():
            folder = tmp_path / f"{arm}-s{seed}" / "eval"
            folder.mkdir(parents=True)
            records = [{**r, "metric": "harmful_score"} for r in _records("harmful", flags)]
            (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    seeds = range(len(SFT))

    def arm(name: str) -> str:
        return ",".join(str(tmp_path / f"{name}-s{seed}" / "eval") for seed in seeds)

    printed = compare_files(arm("sft"), [arm("panacea")])
    expected = paired_difference(
        [PANACEA[s] for s in seeds], [SFT[s] for s in seeds]
    )  # seeds x prompts, each prompt's seeds kept together
    assert f"panacea-s0/eval − sft-s0/eval: harmful HS {expected.text()}" in printed
    assert main(["compare", arm("sft"), str(tmp_path / "panacea-s0" / "eval")]) == 2
    assert "every arm needs as many seeds" in capsys.readouterr().err
