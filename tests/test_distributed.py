"""Distributed fine-tuning: 2 Ray Train workers under DeepSpeed ZeRO-0, 2 and 3 (CPU, gloo), with
gradient accumulation and uneven splits (SPLITS), give what the single-process loop gives on the
whole global batch, step for step, on the tiny random Llama; and the DeepSpeed strategy's passes on
one rank, with 1, 2 and 3 accumulation steps and with bf16 base weights, equal plain PyTorch's.

Tolerance: fp32 throughout; the runs differ only in float rounding (sharded
forward passes, all-reduced sums, AdamW on flat partitions). Measured on this
machine's kind (3 Panacea steps, lr 1e-2): per-step losses and norms agree to
1.2e-7 relative, eps to 6e-8 and the final LoRA weights to 1.6e-6 absolute
(Adam's g / sqrt(v) amplifies the rounding of near-zero gradient elements).
The test allows REL = 1e-5 on metrics and ATOL = 2e-5 on tensors. A backend
that averaged the shards' mean losses without token weighting misses by 1.8e-4
(metrics) and 3e-4 (weights), so the tolerance still tells the two apart.

Cost: one Ray session (module-scoped) and one Ray Train fit per ZeRO stage plus
one in bf16 (about 15-25 s each on 2 cores). DeepSpeed's CPU shared-memory comm
op is not compiled (see strategy/deepspeed.skip_shm_comm_build), so no C++
build is needed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from panacea_platform.training.microbatch import shard_bounds
from panacea_platform.training.strategy.deepspeed import DeepSpeedConfigError, deepspeed_config

# DeepSpeed calls torch.distributed functions torch has deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")

REL = 1e-5
ATOL = 2e-5
WORKERS = 2
# Partition even the tiny model's small tensors under ZeRO-3 (the default keeps
# tensors under 100k elements whole on every rank, which would test nothing).
ZERO3_OPTIONS = {"stage3_param_persistence_threshold": 0}


# -- no Ray needed -------------------------------------------------------------


@pytest.mark.parametrize(
    "user, fragment",
    [
        ({"optimizer": {"type": "Adam"}}, "sets 'optimizer'"),
        ({"scheduler": {"type": "WarmupLR"}}, "sets 'scheduler'"),
        ({"fp16": {"enabled": True}}, "enables fp16"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage 3 but scaling.zero_stage is 2"),
        ({"train_batch_size": 16}, "train_batch_size 16 but optim.batch_size"),
        ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu (3) x num_workers (2)"),
        (
            {"gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 2},
            "gradient_accumulation_steps 2 but optim.grad_accum_steps is 1",
        ),
        ({"gradient_clipping": 5.0}, "gradient_clipping 5.0 but optim.max_grad_norm"),
        ({"bf16": {"enabled": True}}, "enables DeepSpeed's bf16, which keeps the LoRA weights"),
    ],
)
def test_a_users_deepspeed_json_that_contradicts_the_run_is_refused(tmp_path, user, fragment):
    from panacea_platform.training.strategy.deepspeed import user_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(DeepSpeedConfigError) as info:
        user_deepspeed_config(str(path), _FakeOptim(8, 1.0), world_size=2, zero_stage=2)
    assert fragment in str(info.value) and "ds.json" in str(info.value)


def test_a_users_deepspeed_json_keeps_its_own_options_and_gets_the_runs_batch(tmp_path):
    from panacea_platform.training.strategy.deepspeed import user_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "communication_data_type": "fp32"})
    )
    merged = user_deepspeed_config(str(path), _FakeOptim(8, 1.0), world_size=2, zero_stage=2)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert merged["communication_data_type"] == "fp32"
    assert (merged["train_batch_size"], merged["train_micro_batch_size_per_gpu"]) == (8, 4)
    assert merged["zero_allow_untested_optimizer"] is True and merged["gradient_clipping"] == 1.0
    path.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        user_deepspeed_config(str(path), _FakeOptim(8, 1.0), world_size=2, zero_stage=2)


def test_deepspeed_config_splits_any_global_batch():
    optim = _FakeOptim(batch_size=8, max_grad_norm=1.0)
    config = deepspeed_config(optim, world_size=2, zero_stage=3)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 8
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] == 3 and config["zero_allow_untested_optimizer"] is True
    # 10 on 8 workers with 2 accumulation steps: DeepSpeed is told the largest micro-batch; we accumulate.
    uneven = deepspeed_config(_FakeOptim(10, 1.0), world_size=8, zero_stage=2, accumulation=2)
    assert (uneven["train_micro_batch_size_per_gpu"], uneven["gradient_accumulation_steps"]) == (1, 1)
    # DeepSpeed's bf16 stays off: bf16 base weights, fp32 adapter math (ours).
    for stage in (0, 2, 3):
        assert deepspeed_config(_FakeOptim(4, None), 1, stage, dtype="bfloat16")["bf16"]["enabled"] is False
    with pytest.raises(DeepSpeedConfigError, match="grad_accum_steps = 5 cannot be filled by optim.batch_size = 4"):
        deepspeed_config(_FakeOptim(4, None), 1, 2, accumulation=5)
    with pytest.raises(DeepSpeedConfigError, match="zero_stage = 4"):
        deepspeed_config(optim, world_size=2, zero_stage=4)


def test_micro_batches_cover_the_global_batch_once_in_order():
    from panacea_platform.training.microbatch import micro_batches

    batch = {"x": torch.arange(10)}
    for world in (1, 2, 3, 8):
        for accumulation in (1, 2, 3):
            parts = [micro_batches(batch, rank, world, accumulation) for rank in range(world)]
            assert all(len(p) == accumulation for p in parts)
            joined = torch.cat([m["x"] for rank_parts in parts for m in rank_parts])
            assert torch.equal(joined, batch["x"]), (world, accumulation)
    # 10 on 8 workers: two workers hold 2 samples, six hold 1; with 2 steps those six have an empty one.
    sizes = [[len(m["x"]) for m in micro_batches(batch, rank, 8, 2)] for rank in range(8)]
    assert sizes == [[1, 1], [1, 1]] + [[1, 0]] * 6


def test_bad_split_fails_before_any_worker_starts(tiny_llama, placeholder_harmful_file, tmp_path):
    from panacea_platform.training.launch_ray import run_distributed

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1}))
    config = tiny_config(
        tiny_llama,
        placeholder_harmful_file,
        tmp_path,
        "bad",
        optim={"batch_size": 4},
        scaling={"num_workers": 2, "zero_stage": 2, "deepspeed_json": str(ds_json)},
    )
    with pytest.raises(DeepSpeedConfigError, match=r"train_micro_batch_size_per_gpu \(1\) x num_workers \(2\)"):
        run_distributed(config, storage_path=tmp_path / "ray")
    assert not (tmp_path / "bad").exists()


def test_shards_cover_the_batch_once():
    for rows in range(0, 9):
        for world in (1, 2, 3):
            bounds = [shard_bounds(rows, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


class _FakeOptim:
    def __init__(self, batch_size, max_grad_norm):
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm


# -- the backend's protocol on one rank, in this process ------------------------


def _token_batch(seed, rows=3, width=12, vocab=300):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (rows, width), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[0, 9:] = -100  # and rows of different answer lengths
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _backends(tiny_llama, zero_stage, loss_fn=None, accumulation=1, dtype="float32"):
    import copy

    import deepspeed

    from panacea_platform.config import LoraConfig, ModelConfig, OptimConfig
    from panacea_platform.models import attach_lora, load_base_model
    from panacea_platform.training.losses import lm_loss
    from panacea_platform.training.schedule import make_optimizer
    from panacea_platform.training.strategy.deepspeed import DeepSpeedWeights
    from panacea_platform.training.strategy.torch import TorchWeights

    optim = OptimConfig(lr=1e-2, max_steps=3, batch_size=3, max_grad_norm=1.0)
    torch.manual_seed(0)
    model = attach_lora(load_base_model(ModelConfig(name=str(tiny_llama), dtype=dtype)), LoraConfig(rank=4, alpha=8))
    reference = copy.deepcopy(model)
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    loss_fn = loss_fn or lm_loss
    torch_weights = TorchWeights(reference, loss_fn, *make_optimizer(ref_params, optim, 3), optim.max_grad_norm)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, optim, 3)
    options = {"stage3_param_persistence_threshold": 0} if zero_stage == 3 else None
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        dist_init_required=False,
        config=deepspeed_config(optim, 1, zero_stage, zero_options=options, accumulation=accumulation),
    )
    return DeepSpeedWeights(engine, loss_fn, accumulation=accumulation), torch_weights


def _close(actual, expected, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_backend_protocol_matches_torch_weights_on_one_rank(one_rank_group, tiny_llama, zero_stage, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed reads it; launchers (Ray Train included) set it
    ds, ref = _backends(tiny_llama, zero_stage)
    try:
        batch, other = _token_batch(1), _token_batch(2)
        assert ds.weight_shapes() == ref.weight_shapes()
        if zero_stage == 3:
            assert all(p.numel() == 0 or p.numel() < p.ds_numel for p in ds.params), "ZeRO-3 left the weights whole"
        with ds.full_weights() as w:
            _close(w, [p.detach() for p in ref.params], atol=0)

        loss, grads = ds.loss_and_gradient(batch)
        ref_loss, ref_grads = ref.loss_and_gradient(batch)
        assert loss == pytest.approx(ref_loss, rel=1e-6) and any(g.abs().sum() > 0 for g in grads)
        _close(grads, ref_grads)
        # Clamped from above: no gradient, unclamped loss; below the clamp: the plain gradient.
        clamped_loss, clamped = ds.loss_and_gradient(batch, clamp_max=ref_loss - 1.0)
        assert clamped_loss == pytest.approx(ref_loss, rel=1e-6) and all(torch.count_nonzero(g) == 0 for g in clamped)
        _close(ds.loss_and_gradient(batch, clamp_max=ref_loss + 1.0)[1], ref_grads)

        # Perturbed: the loss moves inside, the weights come back bit for bit.
        with ds.full_weights() as w:
            before = [t.clone() for t in w]
        delta = [0.05 * g / (g.norm() + 1e-7) for g in grads]
        with ds.perturbed(delta), ref.perturbed(delta):
            inside, _ = ds.loss_and_gradient(other)
            assert inside == pytest.approx(ref.loss_and_gradient(other)[0], rel=1e-6)
        with ds.full_weights() as w:
            assert all(torch.equal(a, b) for a, b in zip(w, before))

        # An update: the same norm, the same weights.
        direction = [g - 0.1 * h for g, h in zip(grads, ds.loss_and_gradient(other)[1])]
        ref.loss_and_gradient(other)
        assert ds.apply_update(direction) == pytest.approx(ref.apply_update(direction), rel=1e-6)
        with ds.full_weights() as w:
            _close(w, [p.detach() for p in ref.params])
        with pytest.raises(RuntimeError, match="loss_and_gradient pass before"):
            ds.apply_update(direction)

        # add_to_weights moves the optimiser's master copy too: a step with zero
        # direction (AdamW's moments pull a little) must not undo it.
        ds.add_to_weights(delta)
        ref.add_to_weights(delta)
        zeros = [torch.zeros(s) for s in ds.weight_shapes()]
        ds.loss_and_gradient(batch)
        assert ds.apply_update(zeros) == 0.0
        ref.apply_update(zeros)
        with ds.full_weights() as w:
            _close(w, [p.detach() for p in ref.params])
    finally:
        ds.engine.destroy()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_an_amortised_panacea_step_under_zero_matches_one_process(one_rank_group, tiny_llama, zero_stage, monkeypatch):
    """panacea.refresh_every = 2 on a DeepSpeed engine: the kept H and eps live outside the engine, and the
    four steps (refresh, kept, refresh, kept) end at the single process's weights and eps."""
    from panacea_platform.algorithms.defences import Panacea

    monkeypatch.setenv("LOCAL_RANK", "0")
    ds, ref = _backends(tiny_llama, zero_stage)
    try:
        runs = []
        for weights in (ds, ref):
            defence = Panacea(rho=0.5, lam=0.1, harmful_loss_clamp=100.0, refresh_every=2)
            metrics = [defence.step(weights, _token_batch(1), {"harmful": _token_batch(2)}) for _ in range(4)]
            runs.append((metrics, defence.last_eps))
        (ds_metrics, ds_eps), (ref_metrics, ref_eps) = runs
        assert [m["harmful_refreshed"] for m in ds_metrics] == [1.0, 0.0, 1.0, 0.0]
        for got, want in zip(ds_metrics, ref_metrics):
            assert got == pytest.approx(want, rel=1e-5)
        _close(ds_eps, ref_eps, atol=1e-5)
        with ds.full_weights() as w:  # the tolerances of the plain step's equivalence test below
            _close(w, [p.detach() for p in ref.params], atol=5e-4 if zero_stage == 3 else 1e-5)
    finally:
        ds.engine.destroy()


def test_bf16_compute_on_a_zero0_engine_matches_torch_weights_and_keeps_fp32_gradients(
    one_rank_group, tiny_llama, monkeypatch, tiny_run_config
):
    """model.compute_dtype bfloat16 (what the offline job trains with): autocast matrix products, fp32
    LoRA weights and gradients. The engine and plain PyTorch agree to 1e-5 (same shapes, same bf16
    rounding); bf16 moves the loss from fp32's by under 1%."""
    from panacea_platform.algorithms.panacea import panacea_step
    from panacea_platform.training.losses import lm_loss, training_loss

    monkeypatch.setenv("LOCAL_RANK", "0")
    ds, ref = _backends(tiny_llama, 0, training_loss(tiny_run_config(model={"compute_dtype": "bfloat16"})))
    try:
        batch, other = _token_batch(1), _token_batch(2)
        loss, grads = ds.loss_and_gradient(batch)
        ref_loss, ref_grads = ref.loss_and_gradient(batch)
        assert all(g.dtype == torch.float32 for g in grads) and all(p.dtype == torch.float32 for p in ds.params)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        _close(grads, ref_grads, atol=1e-5)
        fp32_loss = lm_loss(ref.module, batch).item()
        assert loss == pytest.approx(fp32_loss, rel=1e-2) and loss != fp32_loss  # bf16 did run
        # Panacea's eps comes from fp32 gradients: its norm is rho to 1e-6.
        result = panacea_step(ds, batch, other, rho=0.5, lam=0.1, harmful_loss_clamp=100.0)
        assert result.eps_norm == pytest.approx(0.5, rel=1e-6) and all(e.dtype == torch.float32 for e in result.eps)
    finally:
        ds.engine.destroy()


def _panacea_steps(weights, batches, rho=0.5, lam=0.1, clamp=100.0):
    from panacea_platform.algorithms.panacea import panacea_step

    results = [panacea_step(weights, batch, harmful, rho, lam, clamp) for batch, harmful in batches]
    return results


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_accumulated_steps_equal_one_pass_over_the_global_batch(one_rank_group, tiny_llama, zero_stage, monkeypatch):
    """Panacea's three passes summed over 1, 2 or 3 micro-batches (uneven: 5 rows as 3+2 and 2+2+1,
    answers of different lengths) equal the plain PyTorch step on the whole batch. Tolerance: fp32
    sums in another order; measured under 1e-6 relative on every loss and norm."""
    from panacea_platform.training.strategy.torch import TorchWeights

    monkeypatch.setenv("LOCAL_RANK", "0")
    batches = [(_token_batch(1, rows=5), _token_batch(2, rows=4)), (_token_batch(3, rows=5), _token_batch(4, rows=4))]
    for accumulation in (1, 2, 3):
        ds, ref = _backends(tiny_llama, zero_stage, accumulation=accumulation)
        accumulated = TorchWeights(
            ref.module, ref.loss_fn, ref.optimizer, ref.scheduler, ref.max_grad_norm, accumulation=accumulation
        )
        try:
            # The plain step's gradient equals the accumulated one's before any update moves the weights.
            _close(accumulated.loss_and_gradient(batches[0][0])[1], ref.loss_and_gradient(batches[0][0])[1])
            got, want = _panacea_steps(ds, batches), _panacea_steps(ref, batches)
            for g, w in zip(got, want):
                for key in ("task_loss", "harmful_loss", "harmful_loss_perturbed", "eps_norm", "update_norm"):
                    assert getattr(g, key) == pytest.approx(getattr(w, key), rel=1e-6), (accumulation, key)
                _close(g.eps, w.eps)
            with ds.full_weights() as weights:
                _close(weights, [p.detach() for p in ref.params], atol=1e-6)
        finally:
            ds.engine.destroy()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_bf16_base_weights_keep_fp32_adapter_math_under_deepspeed(one_rank_group, tiny_llama, zero_stage, monkeypatch):
    """model.dtype bfloat16: the frozen base weights are bf16; the LoRA weights, their gradients, eps and the
    update stay fp32 (DeepSpeed's own bf16 is off), and the engine agrees with plain PyTorch on the same
    bf16 model. Under ZeRO 0 and 2 only the micro-batch sums differ (weights within 1.5e-6). Under ZeRO-3 DeepSpeed
    runs the frozen bf16 linears through its own autograd function, whose bf16 backward rounds otherwise:
    the perturbed pass's gradient differs by 1e-4 (1e-3 of its largest element), which Adam's first step
    (g / (|g| + 1e-8)) turns into weight differences up to 2.2e-4 at lr 1e-2 (measured). Tolerances:
    losses and eps 1e-5; weights 1e-5 (ZeRO 0, 2) and 5e-4 (ZeRO-3)."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    ds, ref = _backends(tiny_llama, zero_stage, dtype="bfloat16", accumulation=2)
    try:
        frozen = [p for p in ds.engine.module.parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
        assert all(p.dtype == torch.float32 for p in ds.params)
        batches = [(_token_batch(1, rows=4), _token_batch(2, rows=3))]
        (got,), (want,) = _panacea_steps(ds, batches), _panacea_steps(ref, batches)
        assert got.eps_norm == pytest.approx(0.5, abs=1e-6) and all(e.dtype == torch.float32 for e in got.eps)
        assert got.task_loss == pytest.approx(want.task_loss, rel=1e-5)
        _close(got.eps, want.eps, atol=1e-5)
        with ds.full_weights() as weights:
            assert all(w.dtype == torch.float32 for w in weights)
            _close(weights, [p.detach() for p in ref.params], atol=5e-4 if zero_stage == 3 else 1e-5)
    finally:
        ds.engine.destroy()


# -- single process against Ray Train + DeepSpeed -------------------------------


@pytest.fixture(scope="module")
def runs(tiny_llama, placeholder_harmful_file, tmp_path_factory):
    return tmp_path_factory.mktemp("distributed-runs")


# Each 2-worker run takes another split of the global batch, against the single-process run on the
# whole batch (no accumulation):
# - ZeRO-0: batch 4 as 2 + 2, no accumulation; harmful batch 3 as 2 + 1;
# - ZeRO-2: batch 5 as 3 + 2, each in 2 micro-batches (2 + 1, 1 + 1); harmful 3 as (1 + 1) + (1 + 0);
# - ZeRO-3: batch 5 in 3 micro-batches a worker (1 + 1 + 1, 1 + 1 + 0: an empty micro-batch), and a
#   harmful batch of 1 that leaves worker 1 with nothing at all.
# Shards of unequal answer-token counts are the norm throughout.
SPLITS = {
    0: dict(batch_size=4, harmful_batch_size=3, grad_accum_steps=1),
    2: dict(batch_size=5, harmful_batch_size=3, grad_accum_steps=2),
    3: dict(batch_size=5, harmful_batch_size=1, grad_accum_steps=3),
}


def _reference(tiny_llama, placeholder_harmful_file, runs, zero_stage, **model):
    from panacea_platform.training.loop import run_stage

    split = {**SPLITS[zero_stage], "grad_accum_steps": 1}
    config = tiny_config(
        tiny_llama,
        placeholder_harmful_file,
        runs,
        f"single{zero_stage}{'-bf16' if model else ''}",
        optim=split,
        model=model,
    )
    result = run_stage(config, "finetune", out=lambda line: None, track=False)
    history = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    return config, result, history


def _distributed(tiny_llama, placeholder_harmful_file, runs, zero_stage, **model):
    from panacea_platform.training.launch_ray import run_distributed

    scaling = {
        "num_workers": WORKERS,
        "zero_stage": zero_stage,
        "zero_options": ZERO3_OPTIONS if zero_stage == 3 else {},
    }
    config = tiny_config(
        tiny_llama,
        placeholder_harmful_file,
        runs,
        f"zero{zero_stage}{'-bf16' if model else ''}",
        optim=SPLITS[zero_stage],
        model=model,
        scaling=scaling,
    )
    return config, run_distributed(config, "finetune", storage_path=runs / "ray", out=lambda line: None)


def _pair(stage, tiny_llama, placeholder_harmful_file, runs, **model):
    return (
        _reference(tiny_llama, placeholder_harmful_file, runs, stage, **model),
        _distributed(tiny_llama, placeholder_harmful_file, runs, stage, **model),
    )


@pytest.fixture(scope="module")
def zero0(ray_session, tiny_llama, placeholder_harmful_file, runs):
    return _pair(0, tiny_llama, placeholder_harmful_file, runs)


@pytest.fixture(scope="module")
def zero2(ray_session, tiny_llama, placeholder_harmful_file, runs):
    return _pair(2, tiny_llama, placeholder_harmful_file, runs)


@pytest.fixture(scope="module")
def zero3(ray_session, tiny_llama, placeholder_harmful_file, runs):
    return _pair(3, tiny_llama, placeholder_harmful_file, runs)


@pytest.fixture(params=[0, 2, 3], ids=["zero0", "zero2", "zero3"])
def pair(request):
    """(single-process reference, 2-worker run) for one ZeRO stage, same config and seed."""
    return request.getfixturevalue(f"zero{request.param}")


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _assert_tensors_close(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for name in expected:
        assert actual[name].shape == expected[name].shape and actual[name].numel() > 0, f"{what}: {name}"
        torch.testing.assert_close(
            actual[name], expected[name], rtol=REL, atol=ATOL, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


def test_per_step_metrics_match_the_single_process_loop(pair):
    (_, _, expected), (_, result) = pair
    assert [h["step"] for h in result.history] == [1, 2, 3]
    for got, want in zip(result.history, expected):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=REL, abs=1e-7), f"step {want['step']} {key}"


def test_final_lora_weights_and_eps_match_the_single_process_loop(pair):
    (_, single, _), (_, result) = pair
    _assert_tensors_close(_adapter(result.unperturbed_adapter_dir), _adapter(single.unperturbed_adapter_dir), "w_T")
    _assert_tensors_close(_adapter(result.adapter_dir), _adapter(single.adapter_dir), "w_T + eps_T")
    eps = load_file(str(result.perturbation_path))
    _assert_tensors_close(eps, load_file(str(single.perturbation_path)), "eps_T")
    for key, value in single.summary.items():
        assert result.summary[key] == pytest.approx(value, rel=REL), key


BF16 = {"dtype": "bfloat16", "compute_dtype": "bfloat16"}
BF16_REL = 2e-3
BF16_ATOL = 5e-3


@pytest.fixture(scope="module")
def bf16(ray_session, tiny_llama, placeholder_harmful_file, runs):
    return _pair(2, tiny_llama, placeholder_harmful_file, runs, **BF16)


def test_bf16_on_two_workers_matches_one_process_and_keeps_eps_at_rho(bf16, zero2):
    """bf16 base weights and bf16 matrix products, fp32 adapter math: 2 workers (ZeRO-2, 2 micro-batches
    each) against one process on the whole batch. bf16 products over a micro-batch round otherwise than
    over the whole batch (the kernels block by the row count), so unlike fp32 the runs are not equal to
    float rounding: measured 6.4e-4 max relative on the per-step metrics and 1.5e-3 max abs on the
    weights after 3 Adam steps at lr 1e-2 (Adam moves an element by up to lr whatever its gradient's
    size). Tolerance: BF16_REL, BF16_ATOL. eps is fp32 with norm rho to 1e-6. bf16 against the same run
    in fp32: printed and bounded."""
    (config, single, expected), (_, result) = bf16
    metric_distance = max(
        abs(got[key] - want[key]) / max(abs(want[key]), 1e-12)
        for got, want in zip(result.history, expected)
        for key in want
        if key != "step"
    )
    got_w, want_w = _adapter(result.unperturbed_adapter_dir), _adapter(single.unperturbed_adapter_dir)
    worker_weight_distance = max(float((got_w[k] - want_w[k]).abs().max()) for k in want_w)
    print(
        f"bf16, 2 workers vs 1 process: metrics {metric_distance:.3g} max relative, "
        f"weights {worker_weight_distance:.3g} max abs"
    )
    assert metric_distance < BF16_REL and worker_weight_distance < BF16_ATOL
    for got in result.history:
        assert got["eps_norm"] == pytest.approx(config.panacea.rho, abs=1e-6)
    eps = load_file(str(result.perturbation_path))
    assert all(t.dtype == torch.float32 for t in eps.values())
    assert torch.linalg.vector_norm(torch.stack([t.norm() for t in eps.values()])).item() == pytest.approx(
        config.panacea.rho, abs=1e-6
    )

    (_, fp32_single, fp32_history), _ = zero2
    bf16_w, fp32_w = _adapter(single.unperturbed_adapter_dir), _adapter(fp32_single.unperturbed_adapter_dir)
    weight_distance = max(float((bf16_w[k] - fp32_w[k]).abs().max()) for k in fp32_w)
    loss_distance = max(abs(b["task_loss"] - f["task_loss"]) / f["task_loss"] for b, f in zip(expected, fp32_history))
    print(
        f"bf16 vs fp32 (one process, 3 steps at lr 1e-2): weights {weight_distance:.3g} max abs, "
        f"task loss {loss_distance:.3g} max relative"
    )
    # Measured: task loss 1.1e-5 relative, weights 0.032 (Adam's steps of up to lr flip sign on elements
    # whose gradient bf16 rounds across zero). The loss is the bound that means something.
    assert 0 < loss_distance < 1e-3 and weight_distance > 0


def test_zero3_adapter_and_eps_are_full_and_reload_to_the_same_outputs(zero3):
    (config, single, _), (_, result) = zero3
    from panacea_platform.models import load_for_eval

    eps = load_file(str(result.perturbation_path))
    norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in eps.values()])).item()
    assert norm == pytest.approx(config.panacea.rho, rel=1e-5)
    for tensors in (_adapter(result.adapter_dir), _adapter(result.unperturbed_adapter_dir), eps):
        assert tensors and all(t.dim() == 2 and t.numel() > 0 for t in tensors.values())

    input_ids = torch.tensor([[1, 5, 9, 14, 30, 7, 2]])
    with torch.no_grad():
        logits = {}
        for name, (adapter, perturbation) in {
            "released": (result.adapter_dir, None),
            "rebuilt": (result.unperturbed_adapter_dir, result.perturbation_path),
            "single": (single.adapter_dir, None),
        }.items():
            model = load_for_eval(config.model, str(adapter), perturbation=str(perturbation) if perturbation else None)
            logits[name] = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits["released"], logits["rebuilt"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["released"], logits["single"], rtol=REL, atol=ATOL)


def test_ray_records_the_run(zero3):
    _, (_, result) = zero3
    assert result.metrics is not None and result.metrics["done"] is True and result.metrics["step"] == 3
    assert result.checkpoint_path is not None and os.path.isdir(result.checkpoint_path)
    assert os.path.isfile(os.path.join(result.checkpoint_path, "perturbation.safetensors"))
    recorded = json.loads((result.run_dir / "distributed.json").read_text())
    assert recorded["num_workers"] == WORKERS and recorded["zero_stage"] == 3


def test_under_zero3_no_worker_holds_the_whole_model(zero2, zero3):
    # HfDeepSpeedConfig before from_pretrained: each of the 2 workers loads its partition only.
    fraction = {
        stage: json.loads((result.run_dir / "distributed.json").read_text())["rank0_local_weight_fraction"]
        for stage, (_, (_, result)) in ((2, zero2), (3, zero3))
    }
    assert fraction[2] == 1.0
    assert fraction[3] < 0.6  # about 1 / 2 workers, plus rounding of the partitions


def test_workers_get_absolute_paths_and_the_drivers_tracking_store(tiny_run_config, tmp_path, monkeypatch):
    # Ray Train workers run in another working directory: relative paths must not reach them.
    from panacea_platform.tracking import default_tracking_uri
    from panacea_platform.training.launch_ray import for_workers

    config = tiny_run_config()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    relative = config.model_copy(update={"output_dir": "runs/rel"})
    relative.model.adapter = "adapter"
    ready = for_workers(relative)
    assert ready.output_dir == str(tmp_path / "runs" / "rel")
    assert ready.model.adapter == str(tmp_path / "adapter")
    assert ready.tracking.tracking_uri == default_tracking_uri("runs/rel") == f"sqlite:///{tmp_path}/runs/rel/mlflow.db"
    assert ready.data.harmful_file == config.data.harmful_file  # already absolute: unchanged


def test_the_driver_reads_the_run_from_ray_trains_storage_not_the_workers_folder(zero2, tmp_path):
    """On a cluster rank 0's run folder is on another node: the driver takes the run from the final
    checkpoint Ray Train persisted, and rebuilds its own run folder from it."""
    import shutil
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from panacea_platform.training.launch_ray import _run_folder_from_storage

    _, (_, result) = zero2
    stored = tmp_path / "storage"
    shutil.copytree(result.checkpoint_path, stored)
    driver_run_dir = tmp_path / "driver" / "run"  # nothing there: the worker wrote on its own disk
    run_dir, record = _run_folder_from_storage(
        SimpleNamespace(checkpoint=Checkpoint.from_directory(str(stored))), driver_run_dir
    )
    assert record["summary"] == result.summary and record["history"] == result.history
    assert record["distributed"]["num_workers"] == WORKERS
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == (
        result.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
