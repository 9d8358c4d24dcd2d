"""The end-masked Panacea variant on closed forms, and the first-token end probability by hand.

A "model" whose logits at every position are its weights w (three tokens, token 2 the end token). The
harmful answer's next token is 0. Panacea's harmful loss is CE over the full softmax, whose gradient
w.r.t. the end logit is softmax_2 > 0: raising the end token is a way up h. The end-masked loss
drops token 2 from the softmax, h = log(1 + e^(w1 - w0)), so its gradient has no end component.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from panacea_platform.algorithms.interface import global_norm
from panacea_platform.algorithms.panacea import panacea_step
from panacea_platform.algorithms.panacea_end_masked import EndMaskedHarmfulLoss, end_masked_cross_entropy
from panacea_platform.training.strategy.torch import TorchWeights

END = 2


class LogitsAreWeights(torch.nn.Module):
    def __init__(self, w=(0.0, 0.0, 0.0)):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.embed = torch.nn.Embedding(4, 1)
        self.embed.weight.requires_grad_(False)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask, logits_to_keep):
        rows = input_ids.shape[0]
        return SimpleNamespace(logits=self.w.expand(rows, len(logits_to_keep), 3))


def batch(*targets):
    """One row; after a one-token prompt, the answer tokens `targets` (label -100 on the prompt)."""
    labels = torch.tensor([[-100, *targets]])
    return {"input_ids": torch.zeros_like(labels), "attention_mask": torch.ones_like(labels), "labels": labels}


def full_softmax_loss(module, b):
    targets = b["labels"][:, 1:]
    logits = module(b["input_ids"], b["attention_mask"], torch.arange(targets.shape[1])).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def weights_at(w, lr=1.0):
    module = LogitsAreWeights(w)
    return module, TorchWeights(module, full_softmax_loss, torch.optim.SGD([module.w], lr=lr))


def test_the_end_masked_loss_is_the_softmax_without_the_end_token_and_ignores_end_targets():
    logits = torch.tensor([[0.3, -1.2, 2.0], [0.5, 0.1, -0.4]], requires_grad=True)
    targets = torch.tensor([0, END])  # the second position's target is the end token: left out
    loss = end_masked_cross_entropy(logits, targets, torch.tensor([END]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.2 - 0.3)), abs=1e-6)
    loss.backward()
    assert logits.grad[0, END] == 0 and torch.all(logits.grad[1] == 0)
    assert end_masked_cross_entropy(logits, torch.tensor([END, -100]), torch.tensor([END])).item() == 0.0


def test_panacea_eps_raises_the_end_logit_and_the_variants_eps_does_not():
    # w = 0: full softmax 1/3 each, H = (-2/3, 1/3, 1/3), eps along it has end component rho / sqrt(6);
    # end-masked: H = (-1/2, 1/2, 0), eps = rho (-1, 1, 0) / sqrt(2).
    objective = EndMaskedHarmfulLoss((END,))
    _, weights = weights_at((0.0, 0.0, 0.0))
    plain = panacea_step(weights, batch(1), batch(0), rho=1.0, lam=0.5)
    torch.testing.assert_close(
        plain.eps[0], torch.tensor([-2, 1, 1], dtype=torch.float64) / math.sqrt(6), atol=1e-6, rtol=0
    )
    _, weights = weights_at((0.0, 0.0, 0.0))
    masked = panacea_step(weights, batch(1), batch(0), rho=1.0, lam=0.5, harmful_objective=objective)
    torch.testing.assert_close(
        masked.eps[0], torch.tensor([-1, 1, 0], dtype=torch.float64) / math.sqrt(2), atol=1e-6, rtol=0
    )
    assert masked.harmful_loss == pytest.approx(math.log(2))


def test_the_variants_update_is_the_closed_form_and_w_is_restored_before_it():
    # G = softmax(0) - onehot(1) = (1/3, -2/3, 1/3); H = (-1/2, 1/2, 0); eps = (-1, 1, 0)/sqrt(2);
    # at w + eps the masked softmax gives p0 = 1 / (1 + e^sqrt(2)), H_eps = (p0 - 1, 1 - p0, 0);
    # d = G - lambda (H_eps - H), and SGD at lr 1 gives w' = -d.
    module, weights = weights_at((0.0, 0.0, 0.0))
    result = panacea_step(weights, batch(1), batch(0), rho=1.0, lam=0.5, harmful_objective=EndMaskedHarmfulLoss((END,)))
    p0 = 1 / (1 + math.exp(math.sqrt(2)))
    assert result.harmful_loss_perturbed == pytest.approx(-math.log(p0), abs=1e-6)
    g = torch.tensor([1 / 3, -2 / 3, 1 / 3], dtype=torch.float64)
    h = torch.tensor([-0.5, 0.5, 0.0], dtype=torch.float64)
    h_eps = torch.tensor([p0 - 1, 1 - p0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(module.w.detach(), -(g - 0.5 * (h_eps - h)), atol=1e-6, rtol=0)
    assert result.eps_norm == pytest.approx(1.0) and global_norm(result.eps).item() == pytest.approx(1.0)


def test_the_objective_counts_answer_tokens_that_are_not_end_tokens():
    objective = EndMaskedHarmfulLoss((END,))
    assert objective.count(batch(0, 1, END)) == 2 and objective.count(batch(END)) == 0


def test_the_clamp_applies_to_the_end_masked_perturbed_loss():
    # w = (0, 3, 0): h(w + eps) = log(1 + e^(3 + sqrt 2)) = 4.43 > clamp 4: H_eps = 0, d = G + lambda H.
    module, weights = weights_at((0.0, 3.0, 0.0))
    result = panacea_step(
        weights,
        batch(1),
        batch(0),
        rho=1.0,
        lam=0.5,
        harmful_loss_clamp=4.0,
        harmful_objective=EndMaskedHarmfulLoss((END,)),
    )
    assert result.harmful_loss_perturbed > 4.0
    w = torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
    softmax = torch.softmax(w, 0)
    g = softmax - torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    p0 = 1 / (1 + math.exp(3.0))
    h = torch.tensor([p0 - 1, 1 - p0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(module.w.detach(), w - (g + 0.5 * h), atol=1e-6, rtol=0)


def test_the_variant_is_registered_with_its_config_and_a_bad_setting_names_the_field(tiny_run_config):
    from panacea_platform.algorithms import build_defence
    from panacea_platform.config import ConfigError, with_changes

    config = tiny_run_config(defence="panacea_end_masked")
    defence = build_defence(with_changes(config, {"panacea_end_masked.rho": 0.7}))
    assert (defence.name, defence.rho) == ("panacea_end_masked", 0.7)
    assert defence.harmful_objective.end_ids[0] == defence_tokenizer_eos(config)
    with pytest.raises(ConfigError, match="panacea_end_masked.rho"):
        with_changes(config, {"panacea_end_masked.rho": -1})


def defence_tokenizer_eos(config):
    from panacea_platform.models import load_tokenizer

    return load_tokenizer(config.model).eos_token_id


# ----------------------------------------------------------------------------- the first-token probe


def test_first_token_end_probability_is_the_softmax_mass_on_the_end_ids_by_hand(tiny_llama):
    """Batched and left-padded, each prompt's P(end first) equals the softmax of one unpadded forward at its
    last position, summed over the end ids (to 1e-5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from panacea_platform.evaluation.first_token import end_probabilities
    from panacea_platform.evaluation.generation import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = ["a placeholder prompt", "a much longer placeholder prompt with more words in it", "short"]
    ends = (tokenizer.eos_token_id, 5)
    found = end_probabilities(model, tokenizer, prompts, ends, batch_size=3)
    for prompt, probability in zip(prompts, found):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        by_hand = sum(math.exp(logits[i].item()) for i in ends) / sum(math.exp(v) for v in logits.tolist())
        assert probability == pytest.approx(by_hand, abs=1e-5)


def test_a_model_without_an_end_token_stops_the_probe_with_the_field(tiny_run_config, capsys, monkeypatch):
    from panacea_platform import models
    from panacea_platform.config import ConfigError
    from panacea_platform.recipes.main_job import _check_end_tokens

    config = tiny_run_config()
    no_end = SimpleNamespace(eos_token_id=None, all_special_tokens=[], convert_tokens_to_ids=lambda t: None)
    monkeypatch.setattr(models, "load_tokenizer", lambda model_config: no_end)
    with pytest.raises(ConfigError, match="evaluation.first_token_probe") as info:
        _check_end_tokens(config, ["sft"], evaluate=True)
    assert "set evaluation.first_token_probe=false" in str(info.value)
    with pytest.raises(ConfigError, match="leave panacea_end_masked out"):
        _check_end_tokens(config, ["panacea_end_masked"], evaluate=False)
    _check_end_tokens(config, ["sft"], evaluate=False)  # nothing reads the end tokens: no error
