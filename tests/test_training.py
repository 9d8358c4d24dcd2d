"""The training loop on a tiny random Llama: what changes, what is saved, what MLflow records."""

import json

import pytest
import torch
from safetensors.torch import load_file

from panacea_platform.config import load_config
from panacea_platform.models import attach_lora, load_base_model, load_for_eval
from panacea_platform.training.loop import lr_factor, run_stage


def _mlflow_run(config, run_id):
    from mlflow.tracking import MlflowClient

    from panacea_platform.tracking import default_tracking_uri

    return MlflowClient(default_tracking_uri(config.output_dir)).get_run(run_id)


def _state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def panacea_run(tiny_llama, placeholder_harmful_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = load_config(
        None,
        [
            f"model.name={tiny_llama}",
            "data.harmful_source=file",
            f"data.harmful_file={placeholder_harmful_file}",
            "data.n=20", "data.defender_harmful_size=16", "data.eval_harmful_size=8", "data.task_eval_size=8",
            "data.alignment_size=16", "data.max_length=48",
            "lora.rank=4", "lora.alpha=8", "lora.target_modules=[q_proj, v_proj]",
            "optim.lr=1e-2", "optim.max_steps=3", "optim.batch_size=4", "optim.harmful_batch_size=4",
            "panacea.rho=0.5", "panacea.lambda=0.1", "panacea.harmful_loss_clamp=100",
            f"output_dir={out}", "run_name=tiny-panacea",
        ],
    )
    result = run_stage(config, "finetune", out=lambda line: None)
    return config, result


def test_only_lora_weights_change(panacea_run):
    config, result = panacea_run
    base = load_base_model(config.model)
    fresh = attach_lora(base, config.lora)
    before = _state(fresh)
    trained = load_for_eval(config.model, str(result.unperturbed_adapter_dir))
    after = _state(trained)
    changed = {n for n in before if n in after and not torch.equal(before[n], after[n])}
    lora_b = {n for n in before if "lora_B" in n}
    assert changed, "training changed nothing"
    assert all("lora_" in n for n in changed), f"non-LoRA weights changed: {sorted(changed - lora_b)[:3]}"
    assert lora_b <= changed  # every LoRA B (initialised to zero) moved


def test_saved_eps_has_norm_rho_and_covers_exactly_the_trainable_weights(panacea_run):
    config, result = panacea_run
    eps = load_file(str(result.perturbation_path))
    norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in eps.values()])).item()
    assert norm == pytest.approx(config.panacea.rho, rel=1e-5)
    assert all("lora_" in name for name in eps)
    assert result.summary["perturbation_norm"] == pytest.approx(config.panacea.rho, rel=1e-5)


def test_released_adapter_is_w_plus_eps_and_reloads(panacea_run):
    config, result = panacea_run
    released = _state(load_for_eval(config.model, str(result.adapter_dir)))
    rebuilt = load_for_eval(config.model, str(result.unperturbed_adapter_dir), perturbation=str(result.perturbation_path))
    for name, value in _state(rebuilt).items():
        torch.testing.assert_close(released[name], value, rtol=0, atol=1e-7)
    unperturbed = _state(load_for_eval(config.model, str(result.unperturbed_adapter_dir)))
    assert any(not torch.equal(released[n], p) for n, p in unperturbed.items())


def test_run_folder_and_mlflow_record_the_run(panacea_run):
    config, result = panacea_run
    assert load_config(result.run_dir / "config.yaml") == config
    history = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert {"task_loss", "harmful_loss", "harmful_loss_perturbed", "eps_norm", "lr"} <= set(history[0])
    run = _mlflow_run(config, result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["panacea.rho"] == "0.5"
    assert run.data.params["defence"] == "panacea"
    assert "data.fingerprint.attack" in run.data.params
    assert run.data.tags["stage"] == "finetune"
    assert "git_commit" in run.data.tags
    assert run.data.metrics["perturbation_norm"] == pytest.approx(0.5, rel=1e-5)


def test_a_failed_run_is_marked_failed_in_mlflow(tiny_run_config, tmp_path):
    # A model folder whose weights are missing fails once the run is open.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    config = tiny_run_config(model={"name": str(broken)}, run_name="broken")
    with pytest.raises(Exception):
        run_stage(config, "finetune", out=lambda line: None)
    from mlflow.tracking import MlflowClient

    from panacea_platform.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(config.output_dir))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"]


def test_bad_data_fails_before_any_run_or_folder_exists(tiny_run_config):
    config = tiny_run_config(data={"eval_harmful_size": 10_000}, run_name="too-big")
    with pytest.raises(ValueError, match="eval_harmful_size"):
        run_stage(config, "finetune", out=lambda line: None)
    assert not config.run_dir().exists()
    assert not (config.run_dir().parent / "mlflow.db").exists()


def test_random_perturbation_is_seeded_and_sized_by_sigma(tiny_run_config):
    results = []
    for run_name in ("rp-a", "rp-b"):
        config = tiny_run_config(
            defence="random_perturbation", random_perturbation={"sigma": 0.05}, run_name=run_name, optim={"max_steps": 1}
        )
        results.append(run_stage(config, "finetune", out=lambda line: None, track=False))
    first, second = (load_file(str(r.perturbation_path)) for r in results)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    values = torch.cat([t.flatten() for t in first.values()])
    assert values.std().item() == pytest.approx(0.05, rel=0.1)


def test_sft_saves_no_perturbation(tiny_run_config):
    config = tiny_run_config(defence="sft", run_name="sft", optim={"max_steps": 1})
    result = run_stage(config, "finetune", out=lambda line: None, track=False)
    assert result.perturbation_path is None and result.unperturbed_adapter_dir is None
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_alignment_adapter_keeps_training_in_finetune(tiny_run_config):
    aligned = run_stage(tiny_run_config(run_name="align"), "align", out=lambda line: None, track=False)
    config = tiny_run_config(defence="sft", run_name="continue", model={"adapter": str(aligned.adapter_dir)},
                             optim={"max_steps": 1})
    result = run_stage(config, "finetune", out=lambda line: None, track=False)
    before = load_file(str(aligned.adapter_dir / "adapter_model.safetensors"))
    after = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys()  # same adapter, not a new one
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_warmup_really_warms_up_for_every_schedule():
    for schedule in ("constant", "linear", "cosine"):
        factor = lr_factor(schedule, warmup_steps=4, total=20)
        ramp = [factor(s) for s in range(5)]
        assert ramp[0] == pytest.approx(0.2)
        assert ramp == sorted(ramp) and ramp[3] < 1.0 and ramp[4] == pytest.approx(1.0)
    assert lr_factor("linear", 0, 10)(9) == pytest.approx(0.1)
    assert lr_factor("cosine", 0, 10)(5) == pytest.approx(0.5)
