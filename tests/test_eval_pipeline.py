"""The evaluation pipeline on the tiny model: batched = one-at-a-time answers, end to end into MLflow, bad input, CLI.

The judge here is a designed one (ParityJudge): it flags a placeholder prompt
whose number is even, so the harmful score of any prompt set is known from the
prompts alone, and a row whose verdict landed on the wrong prompt is caught.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from panacea_platform.config import ConfigError
from panacea_platform.evaluation.judges import JUDGES, Judge, Verdict

PARITY_JUDGE = "test_parity"


class ParityJudge(Judge):
    """Flags a prompt ending in an even number (score 1) and not an odd one (score 0); categories even/odd."""

    name = PARITY_JUDGE

    def judge(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        verdicts = []
        for prompt in prompts:
            even = float(int(re.findall(r"\d+", prompt)[-1]) % 2 == 0)
            verdicts.append(Verdict(even > self.threshold, even, {"even": even, "odd": 1.0 - even}))
        return verdicts


if PARITY_JUDGE not in JUDGES:
    JUDGES.register(PARITY_JUDGE, ParityJudge)


@pytest.fixture
def ray_with_test_judge(ray_session):
    """Ray, with this module's classes shipped by value: Ray's workers cannot import a test module."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _parity_percent(prompts: list[str]) -> float:
    return 100.0 * sum(int(re.findall(r"\d+", p)[-1]) % 2 == 0 for p in prompts) / len(prompts)


def _job_file(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


# ----------------------------------------------------------------------------- generation (no Ray)


def test_batched_greedy_equals_one_at_a_time_with_eos_and_budget(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from panacea_platform.data.templates import render_prompt
    from panacea_platform.evaluation.generation import (
        MIN_SHARED_PREFIX,
        encode_prompt,
        generate,
        generate_one_at_a_time,
        prefill_groups,
        shared_prefix_length,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    # Prompts of very different lengths, so batches carry a lot of left padding.
    prompts = [render_prompt("alpaca", "what is " + " plus ".join(map(str, range(k)))) for k in (1, 9, 3, 14, 2, 6, 11)]
    budget = 12
    # Raw greedy continuations (no EOS in this vocabulary is ever produced by chance here) ...
    with torch.no_grad():
        raw = []
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            out = model.generate(ids, max_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            raw.append(out[0, ids.shape[1] :].tolist())
    # ... then design an EOS the model does emit for some prompts and not for others.
    eos = next(t for t in raw[0] if any(t not in r for r in raw))
    model.generation_config.eos_token_id = eos
    expected = [(r.index(eos) + 1, False) if eos in r else (budget, True) for r in raw]

    batched = generate(model, tokenizer, prompts, budget, batch_size=3)
    single = generate_one_at_a_time(model, tokenizer, prompts, budget)
    assert batched == single
    # A padded-token budget splits batches differently and changes nothing in the answers.
    assert generate(model, tokenizer, prompts, budget, batch_size=7, max_batch_tokens=60) == single
    # One batch of all 7: several prefill groups laid side by side for decoding, same answers.
    assert generate(model, tokenizer, prompts, budget, batch_size=7) == single
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    shared = shared_prefix_length(encoded)
    assert len(prefill_groups(sorted((len(ids) - shared for ids in encoded), reverse=True))) > 1
    assert [(a.new_tokens, a.truncated) for a in batched] == expected
    assert {truncated for _, truncated in expected} == {True, False}  # both cases are exercised
    assert all(a.new_tokens <= budget for a in batched)
    # The template's preamble is long enough that batches run it once and share its KV cache.
    assert shared_prefix_length([encode_prompt(tokenizer, p) for p in prompts]) >= MIN_SHARED_PREFIX

    # One budget per prompt in one batch: each answer is the one that prompt gets alone with its own budget,
    # on the platform's decoder and through HF's generate (which runs the longest budget and cuts).
    budgets = [2, 12, 5, 1, 12, 7, 3]
    mixed = generate(model, tokenizer, prompts, budgets, batch_size=7)
    alone = [generate_one_at_a_time(model, tokenizer, [p], b)[0] for p, b in zip(prompts, budgets)]
    assert mixed == alone and all(a.new_tokens <= b for a, b in zip(mixed, budgets))
    assert any(a.truncated for a in alone) and any(not a.truncated for a in alone)
    model.generation_config.repetition_penalty = 1.1  # not plain greedy: HF's generate() path
    assert generate(model, tokenizer, prompts, budgets, batch_size=7) == [
        generate_one_at_a_time(model, tokenizer, [p], b)[0] for p, b in zip(prompts, budgets)
    ]
    with pytest.raises(ValueError, match="7 budgets for 6 prompts"):
        generate(model, tokenizer, prompts[:6], budgets, batch_size=7)


def test_a_generation_config_beyond_argmax_goes_through_hf_generate(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from panacea_platform.data.templates import render_prompt
    from panacea_platform.evaluation.generation import generate, generate_one_at_a_time, plain_greedy

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts = [render_prompt("alpaca", f"repeat after me: {'a b ' * k}") for k in (1, 4, 2)]
    plain = generate(model, tokenizer, prompts, 10, batch_size=3)
    assert plain_greedy(model)
    model.generation_config.repetition_penalty = 5.0
    assert not plain_greedy(model)
    penalised = generate(model, tokenizer, prompts, 10, batch_size=3)
    assert penalised == generate_one_at_a_time(model, tokenizer, prompts, 10)
    assert penalised != plain  # the penalty is applied, so the fallback path really ran


def test_a_lora_model_decodes_with_grouped_attention_and_equals_one_at_a_time(tiny_llama):
    """PEFT's wrapper must pass the decoder's decode_groups through to attention (it raises otherwise)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from panacea_platform.data.templates import render_prompt
    from panacea_platform.evaluation.generation import generate, generate_one_at_a_time

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    prompts = [render_prompt("alpaca", "what is " + " plus ".join(map(str, range(k)))) for k in (1, 9, 3, 14, 2)]
    assert generate(model, tokenizer, prompts, 8, batch_size=5) == generate_one_at_a_time(model, tokenizer, prompts, 8)


def test_a_sliding_window_cache_goes_through_hf_generate(tiny_llama):
    """Our decoder lays plain cache layers side by side; a model whose cache slides (Mistral) keeps HF's own."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from panacea_platform.data.templates import render_prompt
    from panacea_platform.evaluation.generation import generate, generate_one_at_a_time, plain_cache_layers

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = MistralForCausalLM(config).eval()
    assert not plain_cache_layers(model)
    prompts = [render_prompt("alpaca", f"count {' '.join(map(str, range(k)))}") for k in (1, 7, 3)]
    assert generate(model, tokenizer, prompts, 6, batch_size=3) == generate_one_at_a_time(model, tokenizer, prompts, 6)


def test_length_batches_cap_rows_and_padded_tokens():
    from panacea_platform.evaluation.generation import length_batches

    lengths = [700, 260, 80, 80, 75, 60]  # sorted longest first, as generate sorts them
    # 700 alone (over the budget); 260 + 80 would pad to 520 > 400; then rows of 80 up to 3 per batch.
    assert length_batches(lengths, 3, 400) == [[0], [1], [2, 3, 4], [5]]
    assert length_batches(lengths, 3, None) == [[0, 1, 2], [3, 4, 5]]
    assert length_batches(lengths, 10, 10_000) == [[0, 1, 2, 3, 4, 5]]
    assert length_batches([], 4, 100) == []


def test_prefill_groups_bound_the_padding_share():
    from panacea_platform.evaluation.generation import prefill_groups

    lengths = [100, 90, 40, 38, 36, 10]  # sorted longest first
    # 100+90: 10 of 200 padded; +40 would pad 70 of 300 (> 15%); 40+38+36: 6 of 120; +10 would pad 36 of 160.
    assert prefill_groups(lengths, 0.15) == [[0, 1], [2, 3, 4], [5]]
    assert prefill_groups(lengths, 0.0) == [[0], [1], [2], [3], [4], [5]]
    assert prefill_groups(lengths, 1.0) == [[0, 1, 2, 3, 4, 5]]
    assert prefill_groups([7, 7, 7], 0.0) == [[0, 1, 2]]
    assert prefill_groups([], 0.15) == []


def test_side_by_side_aligns_row_ends_and_decodes_in_place():
    from types import SimpleNamespace

    import torch

    from panacea_platform.evaluation.kv_cache import column_groups, side_by_side

    def column(rows):  # [rows, 1 head, positions, 1 dim]
        return torch.tensor(rows, dtype=torch.float32)[:, None, :, None]

    # Group A: one row, 4 columns. Group B: two rows, 3 columns, its first row left-padded within the group.
    a = SimpleNamespace(
        keys=[column([[10, 11, 12, 13]])],
        values=[-column([[10, 11, 12, 13]])],
        mask=torch.tensor([[1, 1, 1, 1]]),
        logits=torch.tensor([[0.0, 1.0]]),
    )
    b = SimpleNamespace(
        keys=[column([[20, 0, 22], [30, 31, 32]])],
        values=[-column([[20, 0, 22], [30, 31, 32]])],
        mask=torch.tensor([[1, 0, 1], [1, 1, 1]]),
        logits=torch.tensor([[2.0, 3.0], [4.0, 5.0]]),
    )
    [layer], mask, logits, first_columns = side_by_side([a, b], room=2)

    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 0, 1], [0, 1, 1, 1]]
    assert layer.keys[:, 0, :, 0].tolist() == [[10, 11, 12, 13], [0, 20, 0, 22], [0, 30, 31, 32]]
    assert torch.equal(layer.values, -layer.keys)
    assert logits.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert first_columns == [0, 1, 1]
    assert column_groups(first_columns) == ((0, 1, 0), (1, 3, 1))
    assert layer.get_seq_length() == 4

    storage = layer.keys.data_ptr()
    keys, _ = layer.update(column([[1], [2], [3]]), column([[1], [2], [3]]))
    assert keys[:, 0, :, 0].tolist() == [[10, 11, 12, 13, 1], [0, 20, 0, 22, 2], [0, 30, 31, 32, 3]]
    assert keys.data_ptr() == storage  # written in place, not concatenated
    layer.batch_select_indices(torch.tensor([0, 2]))
    keys, _ = layer.update(column([[4], [5]]), column([[4], [5]]))
    assert keys[:, 0, :, 0].tolist() == [[10, 11, 12, 13, 1, 4], [0, 30, 31, 32, 3, 5]]
    with pytest.raises(RuntimeError, match="cache full"):  # room for 2 answer tokens only
        layer.update(column([[6], [7]]), column([[6], [7]]))


def test_column_groups_are_runs_of_equal_first_columns():
    from panacea_platform.evaluation.kv_cache import column_groups

    assert column_groups([0, 5, 5, 5, 9]) == ((0, 1, 0), (1, 4, 5), (4, 5, 9))
    assert column_groups([3, 3]) == ((0, 2, 3),)
    assert column_groups([]) == ()


def test_grouped_attention_equals_sdpa_over_the_padding(tiny_llama):
    """Each run of rows attends only from its first column on; the result is SDPA over all masked columns."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from panacea_platform.evaluation.kv_cache import grouped_attention, grouped_sdpa_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    module = model.model.layers[0].self_attn
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, module.head_dim
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, heads, 1, dim, generator=generator)
    key = torch.randn(3, kv_heads, 6, dim, generator=generator)
    value = torch.randn(3, kv_heads, 6, dim, generator=generator)
    mask = torch.tensor([[True] * 6, [False, False, True, False, True, True], [False, False] + [True] * 4])[
        :, None, None, :
    ]
    reference, _ = sdpa_attention_forward(module, query, key, value, mask)
    grouped, _ = grouped_sdpa_attention(module, query, key, value, mask, decode_groups=((0, 1, 0), (1, 3, 2)))
    torch.testing.assert_close(grouped, reference, rtol=1e-6, atol=1e-6)
    # Columns left of a row's first column are never read: garbage there changes nothing.
    key[1:, :, :2] = float("nan")
    value[1:, :, :2] = float("nan")
    again, _ = grouped_sdpa_attention(module, query, key, value, mask, decode_groups=((0, 1, 0), (1, 3, 2)))
    assert torch.equal(again, grouped)

    # A mask broadcast over the batch (no padding anywhere) is sliced by columns only.
    full = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    reference, _ = sdpa_attention_forward(module, query, key[:, :, 2:], value[:, :, 2:], full[..., 2:])
    grouped, _ = grouped_sdpa_attention(module, query, key, value, full, decode_groups=((0, 3, 2),))
    torch.testing.assert_close(grouped, reference, rtol=0, atol=0)

    with pytest.raises(RuntimeError, match="without decode_groups"):
        grouped_sdpa_attention(module, query, key, value, mask)

    with grouped_attention(model) as switched:
        assert switched and model.config._attn_implementation != "sdpa"
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    with grouped_attention(model) as switched:
        assert not switched and model.config._attn_implementation == "eager"


# ----------------------------------------------------------------------------- bad input (no Ray)


@pytest.fixture
def foreign_adapter(tiny_llama, tmp_path):
    """A LoRA adapter saved for the tiny model, without training (its weights do not matter here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _wider_llama(directory: Path, tiny_llama: Path) -> Path:
    """The tiny model's architecture at hidden size 48 (adapters for the tiny model do not fit it)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama)
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(directory)
    return directory


def test_bad_inputs_give_one_clear_error(tiny_run_config, foreign_adapter, tiny_llama, tmp_path):
    from panacea_platform.evaluation.evaluate import evaluate_model, preset_overrides
    from panacea_platform.evaluation.pipeline import (
        AdapterMismatchError,
        check_adapter,
        evaluation_prompts,
        load_eval_model,
    )

    config = tiny_run_config()
    with pytest.raises(FileNotFoundError, match="--adapter .*no adapter_config.json"):
        evaluate_model(config, tmp_path / "no-such-adapter")
    with pytest.raises(FileNotFoundError, match="--perturbation"):
        evaluate_model(config, foreign_adapter, tmp_path / "missing.safetensors")
    (tmp_path / "eps.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="--perturbation needs --adapter"):
        evaluate_model(config, None, tmp_path / "eps.safetensors")
    with pytest.raises(ConfigError, match=r"evaluation.suites\[harmful\].size = 9 \(its default\): .*holds 8 prompts"):
        evaluation_prompts(tiny_run_config(evaluation={"harmful_prompts": 9}))
    with pytest.raises(ConfigError, match="evaluation.judge .*unknown judge; registered: .*refusal"):
        tiny_run_config(evaluation={"judge": "no_such_judge"})
    with pytest.raises(ConfigError, match="--run-id 'no-such-run'"):
        evaluate_model(config, foreign_adapter, mlflow_run_id="no-such-run")

    # An adapter recorded for another base model: caught from adapter_config.json, before loading anything.
    other = _wider_llama(tmp_path / "other-llama", tiny_llama)
    with pytest.raises(AdapterMismatchError, match="trained on base model .*set model.name"):
        check_adapter(tiny_run_config(model={"name": str(other)}).model, foreign_adapter, None)
    # The same folder name (e.g. a cache on another machine) but other shapes: PEFT's size mismatch, reworded.
    same_name = _wider_llama(tmp_path / "elsewhere" / Path(tiny_llama).name, tiny_llama)
    moved = tiny_run_config(model={"name": str(same_name)})
    check_adapter(moved.model, foreign_adapter, None)
    with pytest.raises(AdapterMismatchError, match="does not fit base model"):
        load_eval_model(moved.model, foreign_adapter)

    bad_suite = tmp_path / "suite.yaml"
    bad_suite.write_text("judge: refusal\n")
    with pytest.raises(ConfigError, match="exactly one top-level section `evaluation:`"):
        preset_overrides(bad_suite)


def test_shipped_presets_are_valid(tiny_run_config, tmp_path):
    from panacea_platform.config import load_config
    from panacea_platform.evaluation.evaluate import preset_overrides

    job = _job_file(tiny_run_config(), tmp_path / "job.yaml")
    presets = sorted(Path(__file__).resolve().parents[1].glob("evaluation/*.yaml"))
    assert {p.stem for p in presets} >= {"offline", "beaver_dam", "llama_guard", "refusal"}
    for preset in presets:
        section = yaml.safe_load(preset.read_text())["evaluation"]
        config = load_config(job, preset_overrides(preset) + ["evaluation.max_new_tokens=7"])
        assert config.evaluation.judge == section["judge"] == preset.stem
        assert config.evaluation.max_new_tokens == 7  # the command line has the last word
        for key, value in section.items():
            if key != "max_new_tokens":
                assert getattr(config.evaluation, key) == value, (preset.name, key)


# ----------------------------------------------------------------------------- Ray Data (few runs: seconds each)


THREE_SUITES = [
    {"name": "harmful", "source": "harmful_heldout", "metric": "harmful_score", "max_new_tokens": 6},
    {"name": "task", "source": "task", "metric": "accuracy", "rule": "task", "max_new_tokens": 4},
    {"name": "capability", "source": "capability", "metric": "accuracy", "size": 4, "max_new_tokens": 3},
]


def test_evaluate_model_end_to_end_into_the_evaluated_run(ray_with_test_judge, tiny_run_config):
    import torch
    from mlflow.tracking import MlflowClient

    from panacea_platform.evaluation.evaluate import evaluate_model
    from panacea_platform.evaluation.generation import generate_one_at_a_time
    from panacea_platform.evaluation.metrics import answer_match, final_number
    from panacea_platform.evaluation.pipeline import evaluation_prompts, load_eval_model
    from panacea_platform.evaluation.stats import wilson_interval
    from panacea_platform.models import load_tokenizer
    from panacea_platform.tracking import default_tracking_uri
    from panacea_platform.training.loop import run_stage

    config = tiny_run_config(
        run_name="evaluated",
        evaluation={
            "judge": PARITY_JUDGE,
            "generation_batch_size": 3,
            "judge_batch_size": 4,
            "task_prompts": 5,
            "suites": THREE_SUITES,
        },
    )
    trained = run_stage(config, "finetune", out=lambda line: None)
    lines: list[str] = []
    result = evaluate_model(config, trained.adapter_dir, mlflow_run_id=trained.mlflow_run_id, out=lines.append)

    rows = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
    prompts = evaluation_prompts(config)
    assert [r["suite"] for r in rows] == ["harmful"] * 8 + ["task"] * 5 + ["capability"] * 4
    assert [r["prompt"] for r in rows] == [p.instruction for p in prompts]
    assert all(
        r["new_tokens"] <= r["max_new_tokens"] == {"harmful": 6, "task": 4, "capability": 3}[r["suite"]] for r in rows
    )
    harmful = [r for r in rows if r["suite"] == "harmful"]
    expected = _parity_percent([r["prompt"] for r in harmful])
    assert 0 < expected < 100  # the designed prompts hold both parities
    for row in harmful:  # each verdict belongs to its own prompt
        assert row["flagged"] == (int(row["prompt"].split()[-1]) % 2 == 0)
        assert row["categories"] == {"even": row["score"], "odd": 1.0 - row["score"]}
        assert row["judge_unparsed"] is False and row["judge_truncated"] is False
    hs = result.rate("harmful", "harmful_score")
    flagged = round(expected * 8 / 100)
    assert (hs.k, hs.n, hs.percent) == (flagged, 8, pytest.approx(expected))
    assert (hs.ci_low, hs.ci_high) == pytest.approx(wilson_interval(flagged, 8))
    assert result.suites["harmful"].judge_categories == {
        "even": pytest.approx(expected),
        "odd": pytest.approx(100 - expected),
    }
    assert result.rate("harmful", "refusal_rate").k == sum(r["refused"] for r in harmful)
    for suite, rule in (("task", final_number), ("capability", answer_match)):
        members = [r for r in rows if r["suite"] == suite]
        for row in members:
            assert (row["extracted"], row["correct"]) == tuple(rule(row["answer"], row["label"]).__dict__.values())
        assert result.rate(suite, "accuracy").k == sum(r["correct"] for r in members)
        assert "harmful_score" not in result.suites[suite].rates
    assert result.suites["task"].counts["n_truncated"] == sum(r["truncated"] for r in rows if r["suite"] == "task")
    assert any("17/17 answers generated and judged" in line for line in lines)

    # The pipeline's batched greedy answers are the authors' one-at-a-time answers, each within its suite's budget.
    model, tokenizer = load_eval_model(config.model, trained.adapter_dir), load_tokenizer(config.model)
    for budget in (6, 4, 3):
        chosen = [p for p in prompts if p.budget == budget]
        single = generate_one_at_a_time(model, tokenizer, [p.rendered for p in chosen], budget)
        assert [rows[p.index]["answer"] for p in chosen] == [a.text for a in single]
        assert [rows[p.index]["truncated"] for p in chosen] == [a.truncated for a in single]

    # w_T + eps_T from adapter_unperturbed/ + perturbation.safetensors is the released adapter/.
    rebuilt = load_eval_model(config.model, trained.unperturbed_adapter_dir, trained.perturbation_path)
    unperturbed = load_eval_model(config.model, trained.unperturbed_adapter_dir)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, dict(rebuilt.named_parameters())[n]) for n, p in lora.items())
    assert not all(torch.equal(p, dict(unperturbed.named_parameters())[n]) for n, p in lora.items())

    # Every rate of every suite, with its interval, is in the evaluated MLflow run.
    client = MlflowClient(default_tracking_uri(config.output_dir))
    run = client.get_run(trained.mlflow_run_id)
    logged = run.data.metrics
    for name, suite in result.suites.items():
        for key, value in suite.rates.items():
            for suffix, number in (("", value.percent), ("_ci_low", value.ci_low), ("_ci_high", value.ci_high)):
                assert logged[f"eval/{name}/{key}{suffix}"] == pytest.approx(number), (name, key, suffix)
        assert logged[f"eval/{name}/n"] == suite.counts["n"]
        assert logged[f"eval/{name}/mean_new_tokens"] == pytest.approx(suite.mean_new_tokens)
    assert logged["eval/harmful/judge_category/even"] == pytest.approx(expected)
    assert logged["eval/harmful/n_judge_unparsed"] == 0
    assert {"eval/task/accuracy_ci_low", "eval/capability/answered_rate_ci_high"} <= set(logged)
    assert run.data.tags["eval.judge.test_parity.judge_threshold"] == "0.5"
    folder = result.samples_path.parent.name
    artifacts = {Path(a.path).name for a in client.list_artifacts(trained.mlflow_run_id, f"eval/{folder}")}
    assert artifacts == {"samples.jsonl", "eval_summary.json", "answers.json"}
    # The answers as a table the MLflow UI shows: one row per sample, in the samples' order.
    table = json.loads(
        Path(client.download_artifacts(trained.mlflow_run_id, f"eval/{folder}/answers.json")).read_text()
    )
    prompt_column = table["columns"].index("prompt")
    assert [row[prompt_column] for row in table["data"]] == [r["prompt"] for r in rows]
    summary = json.loads(result.summary_path.read_text())
    assert summary["suites"]["harmful"]["rates"]["harmful_score"]["percent"] == pytest.approx(expected)
    assert summary["suites"]["capability"]["max_new_tokens"] == 3


def test_cli_evaluate_with_a_preset_and_exit_codes(ray_with_test_judge, tiny_run_config, tmp_path, capsys):
    from panacea_platform.cli import main

    job = _job_file(tiny_run_config(), tmp_path / "job.yaml")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"evaluation": {"judge": PARITY_JUDGE, "max_new_tokens": 4, "task_prompts": 3}}))
    out_dir = tmp_path / "eval-out"
    assert (
        main(
            [
                "evaluate",
                "-c",
                str(job),
                "--preset",
                str(suite),
                "--output-dir",
                str(out_dir),
                "evaluation.harmful_prompts=6",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 + 3
    expected = _parity_percent([r["prompt"] for r in rows if r["suite"] == "harmful"])
    assert re.search(rf"harmful_score\s+{expected:.1f} \[", printed)
    assert f"judge {PARITY_JUDGE}" in printed and "suite task (task, accuracy, rule offline_arithmetic" in printed
    assert str(out_dir / "samples.jsonl") in printed

    for argv in (
        ["evaluate", "-c", str(job), "--adapter", str(tmp_path / "missing")],
        ["evaluate", "-c", str(job), "evaluation.judge=no_such_judge"],
        ["evaluate", "-c", str(job), "--preset", str(tmp_path / "no-suite.yaml")],
        ["bench", "eval", "-c", str(job), "--prompts", "1000"],
    ):
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1, error


def test_where_ray_data_draws_no_bar_the_evaluation_shows_tqdms(
    ray_with_test_judge, tiny_run_config, tmp_path, capsys, monkeypatch
):
    """Under `ray job submit` stdout is a file, where Ray Data logs a count every 10 s with no rate: tqdm's bar
    counts the answers, with a rate and the time left (console.answers_bar)."""
    from panacea_platform.cli import main

    monkeypatch.setenv("PANACEA_PROGRESS", "bars")  # as in a submitted job; pytest's stdout is no terminal
    job = _job_file(tiny_run_config(), tmp_path / "job.yaml")
    argv = ["evaluate", "-c", str(job), "--output-dir", str(tmp_path / "out"), f"evaluation.judge={PARITY_JUDGE}"]
    assert (
        main([*argv, "evaluation.harmful_prompts=4", "evaluation.task_prompts=3", "evaluation.max_new_tokens=3"]) == 0
    )
    shown = capsys.readouterr().err
    assert re.search(r"\[eval\]: 100%\|.*\| 7/7 \[\d\d:\d\d<00:00, +[\d.]+(answer/s|s/answer)\]", shown), shown[-2000:]


def test_a_run_is_evaluated_from_its_mlflow_run_id_alone(
    ray_with_test_judge, tiny_run_config, tmp_path, capsys, monkeypatch
):
    """`panacea evaluate --run-id ID` downloads the released adapter and the base model's name through the
    tracking store, evaluates that model, and logs into the run; an unknown id is one line, exit 2."""
    from mlflow.tracking import MlflowClient

    from panacea_platform.cli import main
    from panacea_platform.tracking import default_tracking_uri
    from panacea_platform.training.loop import run_stage

    config = tiny_run_config(
        run_name="by-id",
        evaluation={"judge": PARITY_JUDGE, "max_new_tokens": 3, "task_prompts": 2, "harmful_prompts": 4},
    )
    trained = run_stage(config, "finetune", out=lambda line: None)
    job = _job_file(
        config.model_copy(update={"model": config.model.model_copy(update={"name": "smollm2-135m-instruct"})}),
        tmp_path / "job.yaml",
    )  # another model in the job: the run's own must be used
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)
    out_dir = empty / "eval"
    assert main(["evaluate", "-c", str(job), "--run-id", trained.mlflow_run_id, "--output-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"run {trained.mlflow_run_id}: its released adapter" in printed and str(config.model.name) in printed
    downloaded = out_dir / "downloaded" / "adapter" / "adapter_model.safetensors"
    assert downloaded.read_bytes() == (trained.adapter_dir / "adapter_model.safetensors").read_bytes()
    logged = MlflowClient(default_tracking_uri(config.output_dir)).get_run(trained.mlflow_run_id).data.metrics
    assert logged["eval/harmful/n"] == 4 and "eval/harmful/harmful_score" in logged

    assert main(["evaluate", "-c", str(job), "--run-id", "0123456789abcdef"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--run-id '0123456789abcdef': no such run" in error


def test_bench_eval_runs_both_ways_with_identical_answers(ray_session, tiny_run_config, tmp_path, capsys):
    from panacea_platform.cli import main

    job = _job_file(
        tiny_run_config(evaluation={"judge": "refusal", "max_new_tokens": 5, "generation_batch_size": 4}),
        tmp_path / "job.yaml",
    )
    assert main(["bench", "eval", "-c", str(job), "--prompts", "7"]) == 0
    printed = capsys.readouterr().out
    assert "greedy answers identical: 7/7" in printed
    # A job that decodes in bfloat16 is checked in float32: batching must change no answer.
    assert main(["bench", "eval", "-c", str(job), "--prompts", "7", "evaluation.decoder_dtype=bfloat16"]) == 0
    again = capsys.readouterr().out
    assert "both sides decode in float32" in again and "greedy answers identical: 7/7" in again
    assert re.search(r"pipeline \(Ray Data\)\s+\d+\.\d+\s+\d+\.\d+", printed)
    assert re.search(r"speed-up: \d+\.\dx after start-up", printed)


def test_bench_eval_decoder_dtypes_prints_ratios_agreement_and_headlines(
    ray_session, tiny_run_config, tmp_path, capsys
):
    from panacea_platform.cli import main

    job = _job_file(
        tiny_run_config(evaluation={"judge": "refusal", "max_new_tokens": 5, "generation_batch_size": 4}),
        tmp_path / "job.yaml",
    )
    # The bench itself refuses a run whose actors decoded in another dtype than asked.
    assert main(["bench", "eval", "-c", str(job), "--prompts", "7", "--decoder-dtypes", "float32,bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"float32\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+1\.00x\s+7/7", printed)
    assert re.search(r"bfloat16\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x\s+\d/7", printed)
    assert re.search(r"bfloat16 \w+: \d/\d answers identical; headline (within|OUTSIDE) float32's interval", printed)
    assert "decoder bfloat16" in printed and "decoder float32" in printed

    for bad in ("float32", "float32,float32", "float32,float16"):
        assert main(["bench", "eval", "-c", str(job), "--decoder-dtypes", bad]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "--decoder-dtypes" in error


def test_a_bfloat16_decoder_merges_the_adapter_then_casts_once(tiny_llama):
    """Merged before rounding: each weight is round(W + B A s), bit for bit, not round(W) + round(B A s)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from panacea_platform.evaluation.pipeline import as_decoder_dtype

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    assert as_decoder_dtype(model, None) is model and as_decoder_dtype(model, "float32") is model
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight + layer.get_delta_weight("default")).detach().to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        reference = model(ids).logits
    decoder = as_decoder_dtype(copy.deepcopy(model), "bfloat16")
    assert not any("lora" in name for name, _ in decoder.named_parameters())
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    assert torch.equal(decoder.model.layers[0].self_attn.q_proj.weight, expected)
    with torch.no_grad():
        logits = decoder(ids).logits.float()
    # bfloat16 keeps 8 bits of mantissa: logits within a few hundredths of the float32 ones' scale.
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()


def test_balanced_order_deals_long_and_short_prompts_evenly_into_full_batches():
    from panacea_platform.evaluation.generation import balanced_order

    costs = [100, 90, 80, 70, 10, 9, 8, 7]
    order = balanced_order(costs, 4)
    assert sorted(order) == list(range(8))
    first, second = order[:4], order[4:]
    # Sorted chunks would cost 340 and 34; dealing to the cheaper chunk gives 100+70+10+7 and 90+80+9+8.
    assert sorted(first) == [0, 3, 4, 7] and sorted(second) == [1, 2, 5, 6]
    # An outlier's chunk fills up with the cheapest items: 100+20+10+1 and 50+40+30+5
    # (dealing in snake order would give 151 and 105).
    outlier = [100, 50, 40, 30, 20, 10, 5, 1]
    order = balanced_order(outlier, 4)
    assert [sorted(order[:4]), sorted(order[4:])] == [[0, 4, 5, 7], [1, 2, 3, 6]]
    # Every chunk but the last is full, so Ray Data's batches of 4 are exactly these chunks.
    uneven = balanced_order([5, 4, 3, 2, 1], 2)
    assert sorted(uneven) == [0, 1, 2, 3, 4] and [sorted(uneven[i : i + 2]) for i in (0, 2)] == [[0, 4], [1, 3]]
    assert uneven[4:] == [2]
    assert balanced_order([], 3) == []
    with pytest.raises(ValueError, match="batch_size"):
        balanced_order([1.0], 0)


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    from panacea_platform.evaluation.generation import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert shared_prefix_length([[7, 8], [9, 8]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0  # one row: nothing to share
