"""panacea.refresh_every = k: H and eps computed on every k-th step and kept in between, the perturbed pass
run every step. On a two-parameter quadratic (task loss 0.5 |w|^2, harmful loss 0.5 (w1^2 + 2 w2^2)),
SGD with lr 1, so every w is a number that can be checked."""

from __future__ import annotations

import torch

from conftest import one_line_exit_2
from panacea_platform.algorithms.defences import Panacea
from panacea_platform.algorithms.interface import global_norm
from panacea_platform.training.strategy.torch import TorchWeights

F64 = torch.float64
RHO, LAM = 0.5, 0.1


class Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
        self.seen: list[torch.Tensor] = []  # w at every forward pass

    def forward(self, batch):
        self.seen.append(self.w.detach().clone())
        scale = torch.tensor([1.0, 1.0] if batch == "task" else [1.0, 2.0], dtype=F64)
        return 0.5 * (scale * self.w**2).sum()


def _run(refresh_every: int, steps: int) -> tuple[Quadratic, list[dict], list[list[torch.Tensor]]]:
    module = Quadratic()
    weights = TorchWeights(module, lambda m, b: m(b), torch.optim.SGD(module.parameters(), lr=1.0))
    defence = Panacea(RHO, LAM, harmful_loss_clamp=100.0, refresh_every=refresh_every)
    metrics, eps = [], []
    for _ in range(steps):
        metrics.append(defence.step(weights, "task", {"harmful": "harm"}))
        eps.append(defence.last_eps)
    return module, metrics, eps


def _papers_step(w: torch.Tensor) -> torch.Tensor:
    """The paper's step written out, in the operations' order: eps = (rho / (|H| + 1e-7)) H, then
    w - (G - lam (H(w + eps) - H))."""
    s = torch.tensor([1.0, 2.0], dtype=F64)
    grad_h = s * w
    eps = (RHO / (global_norm([grad_h]).item() + 1e-7)) * grad_h
    return w - (w - LAM * (s * (w + eps) - grad_h))


def test_refresh_every_1_is_the_papers_step_bit_for_bit():
    module, metrics, _ = _run(1, 3)
    w = torch.tensor([1.0, -2.0], dtype=F64)
    for _ in range(3):
        w = _papers_step(w)
    assert torch.equal(module.w.detach(), w)
    assert len(module.seen) == 9 and "harmful_refreshed" not in metrics[0]


def test_between_refreshes_the_kept_eps_and_h_are_reused_exactly():
    module, metrics, eps = _run(3, 6)
    # Passes per step: 3 on a refresh (task, harmful at w, harmful at w + eps), 2 in between.
    assert len(module.seen) == 3 + 2 + 2 + 3 + 2 + 2
    assert [m["harmful_refreshed"] for m in metrics] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert eps[1] is eps[0] and eps[2] is eps[0] and eps[4] is eps[3] and eps[5] is eps[3]
    assert not torch.equal(eps[3][0], eps[0][0])
    # Step 2, by hand: G at w_2, the perturbed pass at w_2 + eps_1, and H of step 1 (at w_1).
    s = torch.tensor([1.0, 2.0], dtype=F64)
    w1, w2 = module.seen[0], module.seen[3]
    assert torch.equal(module.seen[4], w2 + eps[0][0])  # the perturbed pass of step 2, at the kept eps
    w3 = w2 - (w2 - LAM * (s * (w2 + eps[0][0]) - s * w1))
    assert torch.equal(module.seen[5], w3)  # step 3's first pass sees w_3
    assert metrics[1]["harmful_loss"] == metrics[0]["harmful_loss"]  # h(w) reported is the refresh's


def test_a_refresh_interval_below_1_or_on_a_defence_without_eps_is_one_line(tiny_run_config, tmp_path, capsys):
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_run_config().to_dict()))
    line = one_line_exit_2(["finetune", "--config", str(job), "panacea.refresh_every=0"], capsys)
    assert "panacea.refresh_every" in line and "greater than or equal to 1" in line
    line = one_line_exit_2(["finetune", "--config", str(job), "defence=sft", "panacea.refresh_every=2"], capsys)
    assert "panacea.refresh_every = 2: defence 'sft' does not take Panacea's step" in line
