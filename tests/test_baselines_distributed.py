"""The baselines' passes and the end-masked Panacea variant's on 2 DeepSpeed ranks (ZeRO-2 and ZeRO-3, gloo)
against one process.

Each rank holds the same global batches and takes its share of every pass; the steps see full
gradients and weights, so 2 ranks must give the single process's losses and weights. Vaccine's
hidden-state norm is summed over ranks; Antidote's input norms too. RepNoise's loss is per
micro-batch (the MMD is over a micro-batch's rows, as theirs is per device), so its reference is one
process over the same two micro-batches (accumulation 2). Tolerance: 1e-5 relative / 2e-5 absolute,
as for Panacea's (test_distributed.py): fp32, the ranks sum their gradients in another order than
one process, and AdamW's first steps magnify that on the smallest weights.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from panacea_platform.algorithms.antidote import antidote_perturbation
from panacea_platform.algorithms.booster import booster_step
from panacea_platform.algorithms.lisa import LisaState, lisa_step
from panacea_platform.algorithms.panacea import panacea_step
from panacea_platform.algorithms.panacea_end_masked import EndMaskedHarmfulLoss
from panacea_platform.algorithms.repnoise import RepNoiseObjective, repnoise_step
from panacea_platform.algorithms.vaccine import vaccine_step

WORLD = 2
STEPS = 2
# The variant's "end tokens": about one answer token in eight of the random batches, so each rank drops
# some of its targets and the ranks' counts differ (the global mean must still be one process's).
END_IDS = tuple(range(4, 40))
REL, ATOL = 1e-5, 2e-5


def _batch(seed, rows, width=12, vocab=300):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (rows, width), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[0, 9:] = -100  # rows of different answer lengths
    mask = torch.ones_like(input_ids)
    mask[-1, 10:] = 0  # and a padded row
    labels[-1, 10:] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _run_method(method, weights, step):
    """One step (or Antidote's pruning) of `method`; returns the numbers to compare."""
    align, harmful, user = _batch(10 + step, 5), _batch(20 + step, 3), _batch(30 + step, 5)
    if method == "booster":
        r = booster_step(weights, align, harmful, lam=5.0, alpha=0.1)
        return [r.alignment_loss, r.harmful_loss, r.harmful_loss_after_step, r.update_norm]
    if method == "vaccine":
        r = vaccine_step(weights, align, rho=0.5)
        return [r.alignment_loss, r.perturbed_loss, r.hidden_perturbation_norm, r.update_norm]
    if method == "repnoise":
        objective = RepNoiseObjective(alpha=0.1, beta=0.5, step=step)
        r = repnoise_step(weights, _batch(10 + step, 4), _batch(20 + step, 4), objective)
        return [r.loss, r.update_norm]
    if method == "lisa":
        state = weights.lisa_state
        r = lisa_step(weights, state, align, user)
        return [r.loss, r.proximal, r.update_norm]
    if method == "panacea_end_masked":
        r = panacea_step(weights, user, harmful, rho=0.5, lam=0.5, harmful_objective=EndMaskedHarmfulLoss(END_IDS))
        return [r.task_loss, r.harmful_loss, r.harmful_loss_perturbed, r.eps_norm, r.update_norm]
    if method == "antidote":
        delta = antidote_perturbation(weights, [_batch(40, 5), _batch(41, 3)], 0.25)
        weights.add_to_weights(delta)
        return [float(sum(int((d != 0).sum()) for d in delta))]
    raise ValueError(method)


METHODS = ("booster", "vaccine", "repnoise", "lisa", "antidote", "panacea_end_masked")


def _model(tiny_llama):
    from panacea_platform.config import LoraConfig, ModelConfig
    from panacea_platform.models import attach_lora, load_base_model

    torch.manual_seed(0)
    return attach_lora(load_base_model(ModelConfig(name=str(tiny_llama))), LoraConfig(rank=4, alpha=8))


def _optim():
    from panacea_platform.config import OptimConfig

    return OptimConfig(lr=1e-2, max_steps=STEPS + 1, batch_size=5, max_grad_norm=1.0)


def _trace(method, weights):
    if method == "lisa":
        weights.lisa_state = LisaState(align_steps=1, finetune_steps=1, rho=0.5, warmup_steps=0)
    steps = 1 if method == "antidote" else STEPS + (1 if method == "lisa" else 0)
    return [_run_method(method, weights, step) for step in range(steps)]


ZERO_STAGES = (2, 3)


def _rank(rank, tiny_llama, port, out):
    from panacea_platform.training.strategy.deepspeed import skip_shm_comm_build

    os.environ.update(
        LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    skip_shm_comm_build()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    # Both stages in the same two processes: a spawn of its own per stage cost about 8 s of start-up.
    results = {zero_stage: _trace_every_method(tiny_llama, zero_stage) for zero_stage in ZERO_STAGES}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


def _trace_every_method(tiny_llama, zero_stage):
    import deepspeed

    from panacea_platform.training.losses import lm_loss
    from panacea_platform.training.schedule import make_optimizer
    from panacea_platform.training.strategy.deepspeed import DeepSpeedWeights, deepspeed_config

    results = {}
    options = {"stage3_param_persistence_threshold": 0} if zero_stage == 3 else None
    for method in METHODS:
        accumulation = 1
        model = _model(tiny_llama)
        optimizer, scheduler = make_optimizer([p for p in model.parameters() if p.requires_grad], _optim(), STEPS + 1)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            dist_init_required=False,
            config=deepspeed_config(_optim(), WORLD, zero_stage, zero_options=options, accumulation=accumulation),
        )
        weights = DeepSpeedWeights(engine, lm_loss, accumulation=accumulation)
        trace = _trace(method, weights)
        results[method] = {"trace": trace, "weights": weights.values()}
        engine.destroy()
    return results


def _single(tiny_llama):
    from panacea_platform.training.losses import lm_loss
    from panacea_platform.training.schedule import make_optimizer
    from panacea_platform.training.strategy.torch import TorchWeights

    results = {}
    for method in METHODS:
        model = _model(tiny_llama)
        params = [p for p in model.parameters() if p.requires_grad]
        # RepNoise's MMD is per micro-batch: the rows the two ranks take, as two micro-batches here.
        accumulation = WORLD if method == "repnoise" else 1
        weights = TorchWeights(
            model,
            lm_loss,
            *make_optimizer(params, _optim(), STEPS + 1),
            1.0,
            accumulation=accumulation,
            **({"token_count": lambda b: int(b["input_ids"].shape[0])} if method == "repnoise" else {}),
        )
        results[method] = {"trace": _trace(method, weights), "weights": weights.values()}
    return results


@pytest.fixture(scope="module")
def single(tiny_llama):
    return _single(tiny_llama)


def test_baselines_on_two_ranks_match_one_process_under_zero2_and_zero3(tiny_llama, single, tmp_path):
    pytest.importorskip("deepspeed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ranks.pt"
    torch.multiprocessing.start_processes(_rank, args=(tiny_llama, port, out), nprocs=WORLD, start_method="spawn")
    by_stage = torch.load(out, weights_only=False)
    assert sorted(by_stage) == list(ZERO_STAGES)
    for zero_stage, ranks in by_stage.items():
        for method in METHODS:
            got, want, where = ranks[method], single[method], f"ZeRO-{zero_stage} {method}"
            assert len(got["trace"]) == len(want["trace"]), where
            for step, (a, b) in enumerate(zip(got["trace"], want["trace"])):
                assert a == pytest.approx(b, rel=REL, abs=ATOL), f"{where} step {step}"
            for a, b in zip(got["weights"], want["weights"]):
                torch.testing.assert_close(a, b, rtol=REL, atol=ATOL, msg=lambda m, where=where: f"{where}: {m}")
