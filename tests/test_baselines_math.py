"""Each baseline's math on problems whose numbers can be checked by hand (../shared/defences.md)."""

import math

import pytest
import torch

from panacea_platform.algorithms.antidote import prune_mask
from panacea_platform.algorithms.booster import booster_step
from panacea_platform.algorithms.lisa import LisaState, lisa_step
from panacea_platform.algorithms.repnoise import masked_ce, mmd
from panacea_platform.algorithms.vaccine import vaccine_step
from panacea_platform.training.strategy.torch import TorchWeights

F64 = torch.float64


class Quadratics(torch.nn.Module):
    """w in R^2; batch "A": ||w||^2 / 2; batch "H": w' diag(1, 2) w / 2. Records the w each loss saw."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=F64))
        self.seen = []

    def forward(self, batch):
        self.seen.append(self.w.detach().clone())
        scale = torch.tensor([1.0, 1.0] if batch == "A" else [1.0, 2.0], dtype=F64)
        return 0.5 * (scale * self.w**2).sum()


def _weights(module, lr=1.0):
    # SGD with lr 1 and no clipping: w' = w - d, so the update shows the direction itself.
    return TorchWeights(module, lambda m, b: m(b), torch.optim.SGD(module.parameters(), lr=lr))


def test_booster_direction_is_the_closed_form_and_w_is_restored_exactly():
    module = Quadratics([1.0, 1.0])
    booster_step(_weights(module), "A", "H", lam=5.0, alpha=0.1)
    # d = (1, 1) + 0.5 (1, 4) / sqrt 5
    expected_d = torch.tensor([1.0, 1.0], dtype=F64) + 0.5 * torch.tensor([1.0, 4.0], dtype=F64) / math.sqrt(5)
    torch.testing.assert_close(
        torch.tensor([1.0, 1.0], dtype=F64) - module.w.detach(), expected_d, rtol=0, atol=1e-6
    )  # the 1e-7 added to the norm
    assert expected_d.tolist() == pytest.approx([1.22361, 1.89443], abs=1e-5)
    at_harmful, at_simulated, at_alignment = module.seen
    assert torch.equal(at_harmful, torch.tensor([1.0, 1.0], dtype=F64))
    torch.testing.assert_close(at_simulated, at_harmful - 0.1 * torch.tensor([1.0, 2.0], dtype=F64) / math.sqrt(5))
    assert torch.equal(at_alignment, at_harmful)  # bit-identical: restored from a copy


class _Scale(torch.nn.Module):
    """A block named like an attention block: h = a * x."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, x):
        return (self.a * x,)  # a tuple, as attention blocks return


class _Layer(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.self_attn = _Scale(a)


class Hooked(torch.nn.Module):
    """layers.N.self_attn blocks in sequence on x; loss (sum of the last output - y)^2 / 2."""

    def __init__(self, scales):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(a) for a in scales)

    def forward(self, batch):
        h = batch["x"]
        for layer in self.layers:
            h = layer.self_attn(h)[0]
        return 0.5 * ((h - batch["y"]) ** 2).sum()


def _vaccine_weights(module):
    return TorchWeights(
        module, lambda m, b: m(b), torch.optim.SGD(module.parameters(), lr=1.0), token_count=lambda b: 1
    )


def test_vaccine_perturbs_the_hidden_state_along_its_gradient():
    # h = a x, a = 1, x = 2, y = 1: g = 1, e = rho = 0.5, perturbed loss (2.5 - 1)^2 / 2 = 1.125, dL/da = 1.5 * 2 = 3.
    module = Hooked([1.0])
    batch = {"x": torch.tensor([2.0], dtype=F64), "y": torch.tensor([1.0], dtype=F64)}
    result = vaccine_step(_vaccine_weights(module), batch, rho=0.5)
    assert result.alignment_loss == pytest.approx(0.5)
    assert result.perturbed_loss == pytest.approx(1.125)
    assert result.hidden_perturbation_norm == pytest.approx(0.5)
    assert module.layers[0].self_attn.a.item() == pytest.approx(1.0 - 3.0)  # SGD lr 1: a - dL/da (plain: 2.0)


class Parallel(Hooked):
    """Each block on its own input: loss = sum_l ||a_l x_l - y_l||^2 / 2, so dL/dh_l = h_l - y_l."""

    def forward(self, batch):
        return sum(
            0.5 * ((layer.self_attn(x)[0] - y) ** 2).sum() for layer, x, y in zip(self.layers, batch["x"], batch["y"])
        )


def test_vaccine_normalises_over_all_layers_together():
    # Output gradients (3, 0) and (0, 4), rho = 1: e = (0.6, 0) and (0, 0.8), not a unit vector per layer.
    # Perturbed: h = (3.6, 0) and (0, 4.8): loss 6.48 + 11.52 = 18; dL/da = 3.6 * 3 = 10.8 and 4.8 * 4 = 19.2.
    module = Parallel([1.0, 1.0])
    batch = {
        "x": [torch.tensor([3.0, 0.0], dtype=F64), torch.tensor([0.0, 4.0], dtype=F64)],
        "y": [torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)],
    }
    result = vaccine_step(_vaccine_weights(module), batch, rho=1.0)
    assert result.alignment_loss == pytest.approx(12.5)
    assert result.perturbed_loss == pytest.approx(18.0, abs=1e-5)
    assert result.hidden_perturbation_norm == pytest.approx(1.0)
    assert [1.0 - layer.self_attn.a.item() for layer in module.layers] == pytest.approx([10.8, 19.2], abs=1e-5)


def test_a_model_without_attention_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="no attention blocks"):
        vaccine_step(_vaccine_weights(Quadratics([1.0, 1.0])), "A", rho=1.0)


def test_repnoise_mmd_matches_the_closed_form():
    x, y = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, -1.0]])
    expected = 10 - 2 * sum(math.exp(-v) for v in (4, 2, 1, 0.5, 0.25))
    assert mmd(x, y).item() == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(6.18628, abs=1e-5)
    same = torch.randn(3, 4)
    assert mmd(same, same).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0  # no answer token: 0, not NaN


def test_repnoise_masked_ce_aligns_logits_with_their_targets():
    # m = (0, 1, 1): the targets at positions 1 and 2 count, each from the logits one position before.
    vocab = 5
    logits = torch.zeros(1, 3, vocab, requires_grad=True)
    with torch.no_grad():
        logits[0, 1, 2] = 3.0  # position 1 predicts token 2 well
    ids = torch.tensor([[0, 1, 2]])
    loss = masked_ce(logits, ids, torch.tensor([[0, 1, 1]]))
    second = -torch.log_softmax(torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]), 0)[2].item()
    assert loss.item() == pytest.approx((math.log(vocab) + second) / 2, abs=1e-6)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() > 0  # the span's first token has a gradient (theirs had none)


def test_lisa_alternates_states_and_pulls_towards_the_other_anchor():
    state = LisaState(align_steps=2, finetune_steps=3, rho=1.0, warmup_steps=0)
    assert "".join("A" if state.mode(s) == "align" else "F" for s in range(1, 11)) == "AAFFFAAFFF"

    class Line(torch.nn.Module):  # l_f = (w + 1)^2 / 2, l_a = w^2 / 2
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.5], dtype=F64))

        def forward(self, batch):
            return 0.5 * ((self.w + (1.0 if batch == "F" else 0.0)) ** 2).sum()

    for warmup, expected in ((0, 2.0), (10, 1.5)):
        module = Line()
        weights = _weights(module)
        state = LisaState(align_steps=2, finetune_steps=3, rho=1.0, warmup_steps=warmup, step=2)
        anchor = torch.zeros(1, dtype=F64)  # alignment anchor 0, as if alignment had ended at w = 0
        state.anchors = {"align": [anchor], "finetune": [anchor.clone()]}
        result = lisa_step(weights, state, "A", "F")  # step 3: the first fine-tuning step
        assert result.mode == "finetune"
        # The anchor of the state just left is w now (0.5): the pull is w - 0.5 = 0 at this step ...
        assert state.anchors["align"][0].item() == 0.5
        assert 0.5 - module.w.item() == pytest.approx(1.5)
        # ... so a second fine-tuning step from w = 0.5 against the alignment anchor 0 gives 2.0 (1.5 in warm-up).
        module.w.data.fill_(0.5)
        state.anchors["align"] = [anchor.clone()]
        lisa_step(weights, state, "A", "F")
        assert 0.5 - module.w.item() == pytest.approx(expected)


def test_antidote_prunes_each_row_by_weight_times_input_norm():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 0.5, -1.0, 2.0]])
    norm = torch.tensor([1.0, 1.0, 0.1, 3.0])  # one token x = (1, 1, 0.1, 3)
    pruned = torch.where(prune_mask(w, norm, 0.5), torch.zeros_like(w), w)
    assert pruned.tolist() == [[1.0, 0.0, 3.0, 0.0], [0.0, 0.5, -1.0, 0.0]]


def test_repnoise_pairs_as_many_rows_as_the_shorter_batch_has():
    from panacea_platform.algorithms.repnoise import harmful_part, paired_batch

    def rows(n, fill):
        return {
            "input_ids": torch.full((n, 3), fill),
            "attention_mask": torch.ones(n, 3),
            "labels": torch.full((n, 3), fill),
        }

    # The harmful set's last batch of an epoch is shorter (100 samples in batches of 8 end with 4).
    paired = paired_batch(rows(8, 1), rows(4, 2))
    assert paired["input_ids"].shape[0] == 4 and torch.equal(harmful_part(paired)["input_ids"], torch.full((4, 3), 2))


def test_repnoise_reads_out_only_the_positions_that_count_and_gets_the_same_loss_and_gradient():
    from panacea_platform.algorithms.repnoise import masked_readout_ce

    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 4, dtype=F64, requires_grad=True)
    head = torch.nn.Linear(4, 9, dtype=F64)
    ids = torch.randint(0, 9, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    full = masked_ce(head(hidden), ids, mask)
    (full_grad,) = torch.autograd.grad(full, hidden)
    cheap = masked_readout_ce(hidden, ids, mask, head)
    (cheap_grad,) = torch.autograd.grad(cheap, hidden)
    assert cheap.item() == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(cheap_grad, full_grad, rtol=0, atol=1e-12)


def test_lisas_proximal_term_opens_where_their_0_based_gate_does():
    """LisaTrainer checks state.global_step (0-based during a step) > 0.1 T: with T = 30 the pull starts at
    the fifth step, not the fourth."""

    class Line(torch.nn.Module):  # l = w^2 / 2 on both states; w stays away from the anchors
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.5], dtype=F64))

        def forward(self, batch):
            return 0.5 * (self.w**2).sum()

    weights = _weights(Line(), lr=0.1)  # small steps: w keeps moving away from the alignment anchor
    state = LisaState(align_steps=1, finetune_steps=29, rho=1.0, warmup_steps=0.1 * 30)
    pulled = [lisa_step(weights, state, "A", "F").proximal > 0 for _ in range(6)]
    assert pulled == [False, False, False, False, True, True]


def test_boosters_harmful_batch_is_its_trainers_10_whatever_the_runs(tiny_run_config):
    from panacea_platform.algorithms import build_defence
    from panacea_platform.config import ConfigError, with_changes

    config = tiny_run_config(defence="booster", align_optim={"max_steps": 2, "harmful_batch_size": 4})
    booster = build_defence(config)
    assert booster.harmful_batch_size(config.align_optim) == 10 and booster.settings()["harmful_batch_size"] == 10
    assert build_defence(with_changes(config, {"booster.harmful_batch_size": 6})).harmful_batch_size(config.optim) == 6
    # Every other defence keeps the run's own (RepNoise pairs one harmful row per alignment row).
    assert build_defence(with_changes(config, {"defence": "panacea"})).harmful_batch_size(config.align_optim) == 4
    with pytest.raises(ConfigError, match="booster.harmful_batch_size"):
        with_changes(config, {"booster.harmful_batch_size": 0})


def test_repnoise_paper_mask_counts_what_differs_from_the_alignment_row_padded_or_cut_with_zeros():
    """Their adapt_dimension_b2a: the other row zero-padded or cut to this row's width, then compared."""
    from panacea_platform.algorithms.repnoise import differing_tokens

    harmful = torch.tensor([[5, 6, 7, 8, 1, 1], [5, 9, 9, 9, 9, 0]])  # a padded row (pad 1) and a 0 at its end
    alignment = torch.tensor([[5, 6, 3, 8], [4, 9, 9, 2]])
    assert differing_tokens(harmful, alignment).tolist() == [[0, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0]]
    # On the alignment row's shape: the harmful row cut to 4 tokens.
    assert differing_tokens(alignment, harmful).tolist() == [[0, 0, 1, 0], [1, 0, 0, 1]]


def test_repnoise_averages_k_plus_1_harmful_terms_and_the_last_is_the_models_own(tiny_llama):
    from panacea_platform.algorithms.repnoise import harmful_terms
    from panacea_platform.config import ModelConfig
    from panacea_platform.models import load_base_model

    model = load_base_model(ModelConfig(name=str(tiny_llama)))
    ids = torch.randint(4, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]])
    out = model(input_ids=ids, output_hidden_states=True)
    terms = harmful_terms(model, out, ids, mask)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(terms) == layers + 1
    assert terms[0].item() == pytest.approx(masked_ce(out.logits, ids, mask).item(), rel=1e-6)
    # hs_K is already final-normed: reading it out again (their K + 2nd term) would give another number.
    normed_twice = masked_ce(model.lm_head(model.model.norm(out.hidden_states[-1])), ids, mask)
    assert all(abs(t.item() - normed_twice.item()) > 1e-6 for t in terms)
    first = masked_ce(model.lm_head(model.model.norm(out.hidden_states[0])), ids, mask)
    assert terms[1].item() == pytest.approx(first.item(), rel=1e-5)


@pytest.mark.parametrize("mask", ["answer", "paper"])
def test_repnoise_mask_setting_reaches_its_objective_and_its_alignment_record(tiny_run_config, mask):
    from panacea_platform.algorithms import build_defence
    from panacea_platform.config import with_changes

    defence = build_defence(with_changes(tiny_run_config(defence="repnoise"), {"repnoise.mask": mask}))
    assert defence.objective.mask == mask and defence.settings()["mask"] == mask


def test_repnoise_paper_mask_changes_the_loss_and_answer_mask_is_the_run_loss(tiny_llama):
    """Under 'answer' the retain term is the run's loss; under 'paper' it counts the alignment row's tokens that
    differ from the harmful row, so the two losses differ on the same rows."""
    from panacea_platform.algorithms.repnoise import RepNoiseObjective, paired_batch
    from panacea_platform.config import ModelConfig
    from panacea_platform.models import load_base_model
    from panacea_platform.training.losses import lm_loss

    model = load_base_model(ModelConfig(name=str(tiny_llama)))
    generator = torch.Generator().manual_seed(1)

    def rows(width):
        ids = torch.randint(4, 200, (2, width), generator=generator)
        labels = ids.clone()
        labels[:, :3] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    batch = paired_batch(rows(8), rows(6))
    no_noise = {"alpha": 0.0, "beta": 0.0}  # the retain term alone
    answer = RepNoiseObjective(**no_noise, mask="answer").loss(model, batch, lm_loss)
    assert answer.item() == pytest.approx(lm_loss(model, {k: v for k, v in batch.items() if "harmful" not in k}).item())
    paper = RepNoiseObjective(**no_noise, mask="paper").loss(model, batch, lm_loss)
    assert abs(paper.item() - answer.item()) > 1e-4
