"""The training loop on a tiny random Llama: what changes, what is saved, what MLflow records."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from panacea_platform.config import load_config
from panacea_platform.models import attach_lora, load_base_model, load_for_eval
from panacea_platform.training.loop import run_stage
from panacea_platform.training.schedule import lr_factor


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
            "data.n=20",
            "data.defender_harmful_size=16",
            "data.eval_harmful_size=8",
            "data.task_eval_size=8",
            "data.alignment_size=16",
            "data.max_length=48",
            "lora.rank=4",
            "lora.alpha=8",
            "lora.target_modules=[q_proj, v_proj]",
            "optim.lr=1e-2",
            "optim.max_steps=3",
            "optim.batch_size=4",
            "optim.harmful_batch_size=4",
            "panacea.rho=0.5",
            "panacea.lambda=0.1",
            "panacea.harmful_loss_clamp=100",
            f"output_dir={out}",
            "run_name=tiny-panacea",
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
    rebuilt = load_for_eval(
        config.model, str(result.unperturbed_adapter_dir), perturbation=str(result.perturbation_path)
    )
    for name, value in _state(rebuilt).items():
        torch.testing.assert_close(released[name], value, rtol=0, atol=1e-7)
    unperturbed = _state(load_for_eval(config.model, str(result.unperturbed_adapter_dir)))
    assert any(not torch.equal(released[n], p) for n, p in unperturbed.items())


def test_run_folder_and_mlflow_record_the_run(panacea_run):
    config, result = panacea_run
    from panacea_platform.algorithms.convention import with_convention

    # The run records the convention it fine-tuned under (model.after_alignment resolved).
    saved = load_config(result.run_dir / "config.yaml")
    assert saved == with_convention(config) and saved.model.after_alignment == "continue"
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
    # Whatever transformers raises for a model folder without weights: the run must end FAILED.
    with pytest.raises(Exception):  # noqa: B017
        run_stage(config, "finetune", out=lambda line: None)
    from mlflow.tracking import MlflowClient

    from panacea_platform.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(config.output_dir))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"]


def test_a_new_sqlite_store_is_a_copy_of_one_migrated_template(tmp_path, monkeypatch):
    """Two new stores come from one template, migrated once: each is at the schema MLflow itself migrates
    a new database to, and each holds its own runs only."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from panacea_platform.tracking import Tracker

    def schema(database):
        with sqlite3.connect(database) as connection:
            return connection.execute("select version_num from alembic_version").fetchall()

    monkeypatch.setenv("PANACEA_CACHE", str(tmp_path / "cache"))
    first = Tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "exp", "run-a", artifact_root=tmp_path / "art")
    (template,) = (tmp_path / "cache" / "mlflow-stores").glob("empty-*.db")
    made_at = template.stat().st_mtime_ns
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working directory than the template's
    second = Tracker(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", "exp", "run-b", artifact_root=tmp_path / "art")
    assert template.stat().st_mtime_ns == made_at, "the template was migrated again"
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow-own.db'}").search_experiments()  # MLflow's own migration
    assert schema(tmp_path / "a" / "mlflow.db") == schema(tmp_path / "mlflow-own.db") != []
    # MLflow's Default experiment, made by each store's first opener as in a store MLflow migrated itself.
    own_default = MlflowClient(f"sqlite:///{tmp_path / 'mlflow-own.db'}").get_experiment("0").artifact_location
    assert second.client.get_experiment("0").artifact_location == own_default
    for tracker, name in ((first, "run-a"), (second, "run-b")):
        experiment = tracker.client.get_experiment_by_name("exp")
        assert [r.info.run_name for r in tracker.client.search_runs([experiment.experiment_id])] == [name]
    # No usable cache (here a file where its folder would be): MLflow migrates the new store itself.
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("PANACEA_CACHE", str(tmp_path / "not-a-folder"))
    third = Tracker(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}", "exp", "run-c", artifact_root=tmp_path / "art")
    assert schema(tmp_path / "c" / "mlflow.db") == schema(tmp_path / "mlflow-own.db")
    assert third.client.get_run(third.run_id).info.run_name == "run-c"


def test_a_long_description_is_cut_at_a_line_with_its_code_block_closed(tmp_path, caplog):
    from panacea_platform.tracking import DESCRIPTION_LIMIT, DESCRIPTION_TAG, Tracker

    report = "\n".join(f"method {i:04d}   HS 10.0 [4.0, 23.1]   FA 53.0 [43.3, 62.5]" for i in range(200))
    text = f"**Main job**: placeholder. Command: `panacea demo`\n\n```\n{report}\n```"
    assert len(text) > DESCRIPTION_LIMIT
    with Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "long", artifact_root=tmp_path / "art") as tracker:
        tracker.describe("short, kept as it is")
        assert tracker.client.get_run(tracker.run_id).data.tags[DESCRIPTION_TAG] == "short, kept as it is"
        mlflow_logger = logging.getLogger("mlflow")  # MLflow's records do not reach the root logger
        mlflow_logger.addHandler(caplog.handler)
        try:
            tracker.describe(text, whole_at="demo-summary.txt")
        finally:
            mlflow_logger.removeHandler(caplog.handler)
        stored = tracker.client.get_run(tracker.run_id).data.tags[DESCRIPTION_TAG]
    assert not [r for r in caplog.records if "truncated" in r.getMessage()], "MLflow cut it itself"
    assert len(stored) <= DESCRIPTION_LIMIT
    body, note = stored.rsplit("\n\n", 1)
    limit = f"cut at MLflow's limit of {DESCRIPTION_LIMIT} characters"
    assert note == f"({limit}; the whole text is this run's artifact demo-summary.txt)"
    assert body.endswith("\n```") and body.count("```") == 2  # the report's block closed
    kept = body.removesuffix("\n```")
    assert text.startswith(kept + "\n")  # whole lines only, in order
    assert len(kept) > DESCRIPTION_LIMIT - 200  # and nearly all MLflow can hold


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
            defence="random_perturbation",
            random_perturbation={"sigma": 0.05},
            run_name=run_name,
            optim={"max_steps": 1},
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
    config = tiny_run_config(
        defence="sft", run_name="continue", model={"adapter": str(aligned.adapter_dir)}, optim={"max_steps": 1}
    )
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


def test_the_loss_from_answer_positions_only_equals_the_loss_from_every_logit(tiny_llama):
    """lm_loss projects onto the vocabulary only where a next token is an answer token; the loss and
    the LoRA gradients equal HF's loss over every logit to 1e-6 (rows with answers at different places)."""
    import torch

    from panacea_platform.config import LoraConfig, ModelConfig
    from panacea_platform.models import attach_lora, load_base_model
    from panacea_platform.training.losses import lm_loss

    torch.manual_seed(0)
    model = attach_lora(load_base_model(ModelConfig(name=str(tiny_llama))), LoraConfig(rank=4, alpha=8))
    input_ids = torch.randint(4, 300, (3, 12))
    labels = torch.full_like(input_ids, -100)
    labels[0, 9:] = input_ids[0, 9:]  # a two-token answer at the end
    labels[1, 4:7] = input_ids[1, 4:7]  # an answer in the middle, padding after it
    labels[2, 10:] = input_ids[2, 10:]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]

    full = model(**batch).loss
    full_grads = torch.autograd.grad(full, params)
    kept = lm_loss(model, batch)
    kept_grads = torch.autograd.grad(kept, params)
    assert kept.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_random_perturbation_from_the_sft_run_equals_training_it_in_full(tiny_run_config):
    """0 steps from SFT's w_T (what the main job does) give the released adapter, eps and unperturbed
    adapter of a random-perturbation run trained from scratch: its steps are SFT's, its noise is seeded."""
    from safetensors.torch import load_file

    from panacea_platform.config import ConfigError
    from panacea_platform.training.loop import run_stage

    quiet = {"out": lambda line: None, "track": False}
    sft = run_stage(tiny_run_config(run_name="sft", defence="sft"), "finetune", **quiet)
    full = run_stage(tiny_run_config(run_name="rp-full", defence="random_perturbation"), "finetune", **quiet)
    derived = run_stage(
        tiny_run_config(
            run_name="rp-derived",
            defence="random_perturbation",
            model={"adapter": str(sft.adapter_dir)},
            optim={"max_steps": 0},
        ),
        "finetune",
        **quiet,
    )
    assert derived.history == [] and "final_task_loss" not in derived.summary
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter_unperturbed/adapter_model.safetensors",
        "perturbation.safetensors",
    ):
        expected, actual = load_file(str(full.run_dir / name)), load_file(str(derived.run_dir / name))
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    assert derived.summary["released_heldout_harmful_loss"] == pytest.approx(
        full.summary["released_heldout_harmful_loss"], rel=1e-6
    )
    # 0 steps is for a defence whose steps are SFT's, from an existing adapter; anything else is refused.
    with pytest.raises(ConfigError, match="optim.max_steps = 0: expected at least 1, or 0 with model.adapter"):
        tiny_run_config(defence="panacea", model={"adapter": str(sft.adapter_dir)}, optim={"max_steps": 0})
    with pytest.raises(ConfigError, match="optim.max_steps = 0"):
        tiny_run_config(defence="random_perturbation", optim={"max_steps": 0})
    with pytest.raises(ConfigError, match="align_optim.max_steps = 0"):
        tiny_run_config(align_optim={"max_steps": 0})


class _Rank:
    """One rank's view for mean_loss: its index, the world, and the all-reduce it would join (it keeps
    this rank's partial sums, which the test adds up as the collective would)."""

    def __init__(self, rank, world_size, collective):
        self.rank, self.world_size, self.forward_is_collective = rank, world_size, collective
        self.partial = None

    def all_reduce_sum(self, values):
        self.partial = list(values)
        return list(values)


def test_each_rank_scores_its_shard_of_the_held_out_set_and_the_shards_sum_to_the_whole(tiny_llama):
    from panacea_platform.config import LoraConfig, ModelConfig
    from panacea_platform.training.losses import mean_loss

    torch.manual_seed(0)
    model = attach_lora(load_base_model(ModelConfig(name=str(tiny_llama))), LoraConfig(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(1)
    features = []
    for length in (7, 9, 12, 6, 10, 8, 11, 9, 7):  # 9 examples: 5 batches of 2 (the last one short)
        ids = torch.randint(4, 200, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    whole = mean_loss(model, features, 2, 0)
    calls = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(1))
    for collective, passes in ((False, [3, 2]), (True, [3, 3])):
        ranks = [_Rank(r, 2, collective) for r in range(2)]
        for rank in ranks:
            calls.clear()
            mean_loss(model, features, 2, 0, rank)
            assert len(calls) == passes[rank.rank], (collective, rank.rank)  # its shard only (plus padding)
        total, tokens = (sum(values) for values in zip(*(rank.partial for rank in ranks)))
        assert total / tokens == pytest.approx(whole, rel=1e-6)
    hook.remove()
