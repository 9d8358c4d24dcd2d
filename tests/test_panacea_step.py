"""The Panacea step on quadratics, where eps and the update have closed forms.

w = (1, 2); task loss g(w) = 0.5 ||w - a||^2 with a = 0, harmful loss
h(w) = 0.5 ||w - b||^2 with b = (1.3, 2.4). Then
  G = w - a = (1, 2),  H = w - b = (-0.3, -0.4),  ||H|| = 0.5,
  eps = rho H / ||H|| = (-0.6, -0.8) for rho = 1,
  h(w + eps) = 0.5 ||(-0.9, -1.2)||^2 = 1.125,  H_eps = (-0.9, -1.2),
  d = G - lambda (H_eps - H) = (1, 2) - 0.1 (-0.6, -0.8) = (1.06, 2.08) for lambda = 0.1,
and one SGD step of lr 0.1 gives w' = (0.894, 1.792).
"""

import pytest
import torch

from panacea_platform.algorithms.panacea import panacea_step
from panacea_platform.algorithms.sft import sft_step
from panacea_platform.training.strategy.torch import TorchWeights

A = torch.tensor([0.0, 0.0], dtype=torch.float64)
B = torch.tensor([1.3, 2.4], dtype=torch.float64)


class Quadratic(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.frozen = torch.nn.Parameter(torch.tensor([7.0], dtype=torch.float64), requires_grad=False)
        self.seen = []  # the weights each loss evaluation saw

    def forward(self, target):
        self.seen.append(self.w.detach().clone())
        return 0.5 * ((self.w - target) ** 2).sum() + 0.0 * self.frozen.sum()


def quadratic_loss(module, batch):
    return module(batch)


def make_weights(w=(1.0, 2.0), lr=0.1):
    module = Quadratic(list(w))
    optimizer = torch.optim.SGD([module.w], lr=lr)
    return module, TorchWeights(module, quadratic_loss, optimizer)


def test_eps_is_rho_along_the_normalised_harmful_gradient():
    module, weights = make_weights()
    result = panacea_step(weights, A, B, rho=1.0, lam=0.1)
    expected_eps = torch.tensor([-0.6, -0.8], dtype=torch.float64)
    torch.testing.assert_close(result.eps[0], expected_eps, rtol=0, atol=1e-6)
    assert result.eps_norm == pytest.approx(1.0, abs=1e-6)
    assert result.task_loss == pytest.approx(0.5 * 5.0)
    assert result.harmful_loss == pytest.approx(0.125)
    assert result.harmful_loss_perturbed == pytest.approx(1.125, abs=1e-6)


def test_eps_norm_equals_rho_for_any_rho():
    for rho in (0.01, 0.3, 2.5):
        _, weights = make_weights()
        assert panacea_step(weights, A, B, rho=rho, lam=0.1).eps_norm == pytest.approx(rho, rel=1e-6)


def test_update_direction_and_sgd_step():
    module, weights = make_weights()
    panacea_step(weights, A, B, rho=1.0, lam=0.1)
    torch.testing.assert_close(module.w.detach(), torch.tensor([0.894, 1.792], dtype=torch.float64), rtol=0, atol=1e-6)


def test_third_pass_sees_w_plus_eps_and_w_is_restored_before_the_update():
    module, weights = make_weights()
    panacea_step(weights, A, B, rho=1.0, lam=0.1)
    at_task, at_harmful, at_perturbed = module.seen
    assert torch.equal(at_task, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.equal(at_harmful, at_task)
    torch.testing.assert_close(at_perturbed, torch.tensor([0.4, 1.2], dtype=torch.float64), rtol=0, atol=1e-6)


def test_clamp_removes_the_gradient_of_a_harmful_loss_above_it():
    # h(w + eps) = 1.125 > clamp 1.0: H_eps = 0, so d = G + lambda H = (0.97, 1.96).
    module, weights = make_weights()
    result = panacea_step(weights, A, B, rho=1.0, lam=0.1, harmful_loss_clamp=1.0)
    assert result.harmful_loss_perturbed == pytest.approx(1.125, abs=1e-6)  # reported unclamped
    torch.testing.assert_close(
        module.w.detach(), torch.tensor([1 - 0.097, 2 - 0.196], dtype=torch.float64), rtol=0, atol=1e-6
    )


def test_default_clamp_is_five():
    # b far away: h(w + eps) > 5, so with the default clamp only G + lambda H remains.
    far = torch.tensor([5.0, 6.0], dtype=torch.float64)  # H = (-4, -4), h = 16
    module, weights = make_weights()
    panacea_step(weights, A, far, rho=1.0, lam=0.1)
    expected = torch.tensor([1.0, 2.0]) - 0.1 * (torch.tensor([1.0, 2.0]) + 0.1 * torch.tensor([-4.0, -4.0]))
    torch.testing.assert_close(module.w.detach(), expected.double(), rtol=0, atol=1e-6)


def test_lambda_zero_is_plain_sft():
    panacea_module, panacea_weights = make_weights()
    sft_module, sft_weights = make_weights()
    panacea_step(panacea_weights, A, B, rho=1.0, lam=0.0)
    sft_step(sft_weights, A)
    assert torch.equal(panacea_module.w, sft_module.w)


def test_frozen_weights_are_never_touched():
    module, weights = make_weights()
    panacea_step(weights, A, B, rho=1.0, lam=0.1)
    assert torch.equal(module.frozen, torch.tensor([7.0], dtype=torch.float64))
    assert len(weights.params) == 1


def test_perturbed_restores_weights_bit_exactly():
    # Values where (w + d) - d != w in floating point.
    module, weights = make_weights(w=(0.1, 1e-9))
    before = module.w.detach().clone()
    delta = [torch.tensor([0.2, 1e8], dtype=torch.float64)]
    assert not torch.equal((before + delta[0]) - delta[0], before)  # the trap is real
    with weights.perturbed(delta):
        assert torch.equal(module.w.detach(), before + delta[0])
    assert torch.equal(module.w.detach(), before)


def test_perturbed_restores_even_when_the_block_raises():
    module, weights = make_weights()
    before = module.w.detach().clone()
    with pytest.raises(RuntimeError):
        with weights.perturbed([torch.ones(2, dtype=torch.float64)]):
            raise RuntimeError("boom")
    assert torch.equal(module.w.detach(), before)


def test_eps_does_not_alias_gradients_of_later_passes():
    # The authors' eps aliases the gradient buffer; ours must survive the next step.
    module, weights = make_weights()
    first = panacea_step(weights, A, B, rho=1.0, lam=0.1)
    kept = first.eps[0].clone()
    panacea_step(weights, A, B, rho=1.0, lam=0.1)
    assert torch.equal(first.eps[0], kept)


def test_zero_harmful_gradient_gives_zero_eps_not_nan():
    module, weights = make_weights(w=(1.3, 2.4))  # w = b: H = 0
    result = panacea_step(weights, A, B, rho=1.0, lam=0.1)
    assert torch.equal(result.eps[0], torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(module.w).all()


def test_only_defences_that_keep_sfts_step_may_reuse_an_sft_run():
    from panacea_platform.algorithms.defences import Defence, Panacea, RandomPerturbation

    class OwnStep(Defence):  # a new plugin that changes the step but forgets to say so
        def step(self, weights, batch, extra):
            return {}

    assert Defence.trains_as_sft() and RandomPerturbation.trains_as_sft()
    assert not Panacea.trains_as_sft() and not OwnStep.trains_as_sft()
