"""Each defence fine-tunes under its authors' convention (algorithms/convention.py) unless the job sets one for all;
the merge it needs, under ZeRO-3 too; Antidote prunes only the fresh fine-tuning LoRA, exactly where its scores say."""

import hashlib
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from panacea_platform.algorithms.convention import describe, set_by_convention, with_convention
from panacea_platform.cli import main
from panacea_platform.config import with_changes
from panacea_platform.training.dispatch import train

QUIET = {"out": lambda line: None}


def test_each_defence_runs_under_its_authors_convention_by_default(tiny_run_config):
    config = tiny_run_config()
    assert config.model.after_alignment == "authors"
    job = (config.lora, config.optim)
    for defence in ("sft", "panacea", "booster", "random_perturbation", "panacea_end_masked"):
        resolved = with_convention(with_changes(config, {"defence": defence}))
        assert resolved.model.after_alignment == "continue" and (resolved.lora, resolved.optim) == job, defence
    for defence in ("vaccine", "repnoise"):  # a fresh LoRA of the run's own shape
        resolved = with_convention(with_changes(config, {"defence": defence}))
        assert resolved.model.after_alignment == "merge" and (resolved.lora, resolved.optim) == job, defence
    lisa = with_convention(with_changes(config, {"defence": "lisa"}))
    assert lisa.model.after_alignment == "merge"
    assert (lisa.lora.rank, lisa.lora.alpha, lisa.lora.dropout, lisa.lora.target_modules) == (
        8,
        4.0,
        0.1,
        ["q_proj", "v_proj"],
    )
    assert (lisa.optim.lr, lisa.optim.batch_size, lisa.optim.weight_decay) == (1e-5, 5, 0.0)
    assert lisa.optim.max_steps == config.optim.max_steps  # only what the convention names changes
    antidote = with_convention(with_changes(config, {"defence": "antidote"}))
    assert (antidote.lora.rank, antidote.lora.target_modules) == (256, ["q_proj", "k_proj", "v_proj"])
    assert with_convention(lisa) == lisa  # idempotent
    assert describe(lisa) == (
        "a fresh LoRA on the base model (r8 a4 on q_proj,v_proj, dropout 0.1); lr 1e-05, batch 5, weight decay 0"
    )


def test_a_convention_the_job_sets_applies_to_every_defence_alike(tiny_run_config):
    config = tiny_run_config(defence="lisa", model={"after_alignment": "continue"})
    assert with_convention(config) == config
    assert set_by_convention(config, "optim.lr") is None
    authors = with_changes(config, {"model.after_alignment": "authors"})
    assert set_by_convention(authors, "optim.lr") == "lisa.fine_tuning.lr"
    assert set_by_convention(authors, "lisa.rho") is None


def test_a_sweep_cannot_search_what_the_convention_sets(tiny_run_config):
    from panacea_platform.search.space import SearchSpaceError, check_against_job, space_from_dict

    space = space_from_dict(
        {
            "metric": "heldout_harmful_loss",
            "mode": "min",
            "searcher": "grid",
            "num_samples": 1,
            "parameters": {"optim.lr": {"grid": [1e-3, 1e-2]}},
        }
    )
    with pytest.raises(SearchSpaceError, match=r"parameters.optim.lr: defence 'lisa' .* \(lisa.fine_tuning.lr\)"):
        check_against_job(space, tiny_run_config(defence="lisa"))
    check_against_job(space, tiny_run_config(defence="lisa", model={"after_alignment": "merge"}))


@pytest.mark.parametrize(
    "override, fragment",
    [
        # The authors' r256 is for a 7B model: the tiny model's v_proj is 32 -> 16.
        ("defence=antidote", "antidote.fine_tuning.lora_rank = 256: rank 256 exceeds 16, the smaller side of k_proj"),
        (
            "lisa.fine_tuning.lora_target_modules=[nope]",
            "lisa.fine_tuning.lora_target_modules = ['nope']: no linear module named nope",
        ),
        (
            "lisa.fine_tuning.after_alignment=continue",
            "lisa.fine_tuning: lora_rank, lora_alpha, lora_dropout, lora_target_modules: the shape of a fresh LoRA",
        ),
        ("model.after_alignment=always", "model.after_alignment"),
    ],
)
def test_a_convention_a_run_cannot_hold_is_one_line_and_exit_2(tiny_run_config, tmp_path, capsys, override, fragment):
    config = tiny_run_config(defence="lisa")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["finetune", "--config", str(path), override]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], errors
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _aligned_adapter(tiny_llama, where):
    """An adapter as alignment leaves one: LoRA r4 on q, k, v with non-zero B (so merging it changes the base)."""
    from panacea_platform.config import LoraConfig, ModelConfig
    from panacea_platform.models import attach_lora, load_base_model

    torch.manual_seed(3)
    model = attach_lora(load_base_model(ModelConfig(name=str(tiny_llama))), LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(str(where))
    return where


def _peft_merged(tiny_llama, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(adapter)
    ).merge_and_unload()


def test_merging_equals_peft_merge_and_unload(tiny_llama, tmp_path):
    from panacea_platform.config import ModelConfig
    from panacea_platform.models import load_base_model

    adapter = _aligned_adapter(tiny_llama, tmp_path / "aligned")
    ours = load_base_model(ModelConfig(name=str(tiny_llama), adapter=str(adapter), after_alignment="merge"))
    theirs = _peft_merged(tiny_llama, adapter).state_dict()
    base = load_base_model(ModelConfig(name=str(tiny_llama))).state_dict()
    changed = set()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=1e-6)  # fp32; ours sums in float64
        if not torch.equal(value, base[name]):
            changed.add(name)
    assert changed == {n for n in base if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))}


def test_merge_under_zero3_gathers_the_partitioned_weights(one_rank_group, tiny_llama, tmp_path, monkeypatch):
    """The aligned adapter merged into weights ZeRO-3 partitioned at load equals one process's merge."""
    import deepspeed

    from panacea_platform.config import config_from_dict
    from panacea_platform.training.strategy.deepspeed import DeepSpeedStrategy, deepspeed_config

    monkeypatch.setenv("LOCAL_RANK", "0")
    adapter = _aligned_adapter(tiny_llama, tmp_path / "aligned")
    config = config_from_dict(
        {
            "model": {"name": str(tiny_llama), "adapter": str(adapter), "after_alignment": "merge"},
            "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "optim": {"batch_size": 2},
        }
    )
    ds_config = deepspeed_config(config.optim, 1, 3, zero_options={"stage3_param_persistence_threshold": 0})
    model = DeepSpeedStrategy(ds_config, 3, rank=0, world_size=1).load_model(config)
    weights = dict(model.base_model.model.named_parameters())
    assert all(hasattr(p, "ds_id") and p.numel() < p.ds_numel for n, p in weights.items() if "q_proj.base_layer" in n)
    reference = _peft_merged(tiny_llama, adapter).state_dict()
    for name, weight in weights.items():
        if "lora_" in name:
            continue
        with deepspeed.zero.GatheredParameters([weight]):
            whole = weight.detach().clone()
        torch.testing.assert_close(whole, reference[name.replace(".base_layer", "")], rtol=0, atol=1e-6)


def _sha(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _input_norms(model, samples, factors):
    """n_j per LoRA factor module: the root of the mean over samples of the sum over tokens of x_j^2, each sample
    alone (no padding), in float64, by forward hooks: computed apart from the platform's own InputNorms."""
    modules = dict(model.named_modules())
    sums = {name: 0 for name in factors}
    hooks = [
        modules[name].register_forward_hook(
            lambda module, args, out, name=name: sums.__setitem__(
                name, sums[name] + args[0].double().pow(2).sum(dim=(0, 1))
            )
        )
        for name in factors
    ]
    with torch.no_grad():
        for ids in samples:
            model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return {name: (value / len(samples)).sqrt() for name, value in sums.items()}


def test_antidote_prunes_only_the_fresh_lora_exactly_where_its_scores_say(
    tiny_llama, placeholder_harmful_file, tmp_path
):
    from conftest import tiny_config
    from panacea_platform.data.collate import tokenize_example
    from panacea_platform.models import load_for_eval, load_tokenizer
    from panacea_platform.training.stage_data import prepare_data

    adapter = _aligned_adapter(tiny_llama, tmp_path / "aligned")
    before = _sha(adapter)
    delta = 0.25
    config = tiny_config(
        tiny_llama,
        placeholder_harmful_file,
        tmp_path,
        "antidote",
        defence="antidote",
        model={"adapter": str(adapter)},
        antidote={
            "prune_ratio": delta,
            "calibration_samples": 20,
            "fine_tuning": {"after_alignment": "merge", "lora_rank": 8, "lora_target_modules": ["q_proj", "v_proj"]},
        },
    )
    released = train(config, "finetune", **QUIET)
    resolved = with_convention(config)
    assert _sha(adapter) == before  # the alignment's own files are untouched
    pruned = load_file(str(released.adapter_dir / "adapter_model.safetensors"))
    w_t = load_file(str(released.unperturbed_adapter_dir / "adapter_model.safetensors"))
    # Only the fresh LoRA is released and pruned: r8 on q, v, not the aligned r4 on q, k, v.
    assert {n.split(".")[-3] for n in pruned} == {"q_proj", "v_proj"}
    assert all(t.shape[0] == 8 for n, t in pruned.items() if "lora_A" in n)
    # The merged alignment is the same in the released and the unpruned model, bit for bit.
    model = load_for_eval(resolved.model, str(released.unperturbed_adapter_dir))
    released_model = load_for_eval(resolved.model, str(released.adapter_dir))
    base = {n: p for n, p in released_model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in base.items())
    # Exactly the entries the scores select are zero: per row, all but the floor(cols (1 - delta)) lowest.
    tokenizer = load_tokenizer(resolved.model)
    samples = [
        tokenize_example(tokenizer, resolved.data.prompt_template, e, resolved.data.max_length)["input_ids"]
        for e in prepare_data(resolved, "finetune").calibration
    ]
    assert len(samples) == 20
    factor = {name: name[: -len(".weight")] + ".default" for name in w_t}  # the saved key's module in the model
    norms = _input_norms(model, samples, list(factor.values()))
    for name, weight in w_t.items():
        norm = norms[factor[name]]
        scores = weight.double().abs() * norm.unsqueeze(0)
        kept = math.floor(weight.shape[1] * (1 - delta))
        selected = torch.zeros_like(weight, dtype=torch.bool)
        selected.scatter_(1, scores.argsort(dim=1, descending=True)[:, : weight.shape[1] - kept], True)
        assert torch.equal(pruned[name] == 0, selected | (weight == 0)), name
        assert torch.equal(pruned[name][~selected], weight[~selected]), name
