"""Layer-wise eps analysis: literal tensors with hand-computed norms, then a real tiny Panacea run."""

from __future__ import annotations

import math

import pytest
import torch

from panacea_platform.analysis import aggregate, analyse_run, format_layer_table, module_norms, write_layer_analysis

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V0 = "base_model.model.model.layers.0.self_attn.v_proj"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj"


def _lora(a, b):
    return torch.tensor(a), torch.tensor(b)


def test_module_norms_by_hand():
    # w: A = [[3, 4]] (||A|| = 5), B = [[1], [0]]; eps moves only B, by [[0], [1]].
    lora = {f"{Q0}.lora_A.weight": torch.tensor([[3.0, 4.0]]), f"{Q0}.lora_B.weight": torch.tensor([[1.0], [0.0]])}
    # eps is keyed as PEFT names weights in memory (".default."), the adapter as saved.
    eps = {
        f"{Q0}.lora_A.default.weight": torch.zeros(1, 2),
        f"{Q0}.lora_B.default.weight": torch.tensor([[0.0], [1.0]]),
    }
    base = torch.tensor([[6.0, 0.0], [0.0, 8.0]])  # ||W_base|| = 10
    [row] = module_norms(eps, lora, scale=2.0, base_weight=lambda module: base)
    assert row.module == "model.layers.0.self_attn.q_proj"
    assert (row.layer, row.kind) == (0, "q_proj")
    assert row.eps_norm == pytest.approx(1.0)
    assert row.lora_norm == pytest.approx(math.sqrt(26.0))
    assert row.relative_to_lora == pytest.approx(1 / math.sqrt(26.0))
    # dW = 2 * eps_B @ A = [[0, 0], [6, 8]]: norm 10, against ||W_base|| = 10.
    assert row.merged_change == pytest.approx(10.0)
    assert row.relative_to_base == pytest.approx(1.0)


def test_aggregate_per_layer_and_kind():
    lora, eps = {}, {}
    for module, eps_scale in ((Q0, 1.0), (V0, 2.0), (Q1, 3.0)):
        lora[f"{module}.lora_A.weight"] = torch.ones(1, 4)  # norm 2
        lora[f"{module}.lora_B.weight"] = torch.zeros(4, 1)
        eps[f"{module}.lora_A.default.weight"] = torch.full((1, 4), eps_scale / 2)  # norm eps_scale
        eps[f"{module}.lora_B.default.weight"] = torch.zeros(4, 1)
    rows = module_norms(eps, lora, scale=1.0)
    layers = {g.group: g for g in aggregate(rows, "layer")}
    assert layers["layer 0"].eps_norm == pytest.approx(math.sqrt(1 + 4))
    assert layers["layer 0"].relative_to_lora == pytest.approx(math.sqrt(5) / math.sqrt(8))
    assert layers["layer 1"].relative_to_lora == pytest.approx(3 / 2)
    kinds = {g.group: g for g in aggregate(rows, "kind")}
    assert kinds["q_proj"].eps_norm == pytest.approx(math.sqrt(1 + 9))
    assert kinds["v_proj"].relative_to_lora == pytest.approx(1.0)
    assert kinds["q_proj"].relative_to_base is None  # no base weights given
    table = format_layer_table(rows)
    assert "layer 1" in table and "v_proj" in table


def test_perturbation_for_a_module_the_adapter_lacks_is_an_error():
    lora = {f"{Q0}.lora_A.weight": torch.ones(1, 2), f"{Q0}.lora_B.weight": torch.ones(2, 1)}
    eps = {f"{Q1}.lora_A.default.weight": torch.ones(1, 2)}
    with pytest.raises(ValueError, match="layers.1.self_attn.q_proj"):
        module_norms(eps, lora, scale=1.0)


def test_analyse_a_real_tiny_panacea_run(tiny_run_config, tiny_llama, tmp_path):
    from panacea_platform.training.loop import run_stage

    result = run_stage(tiny_run_config(), "finetune", track=False, out=lambda line: None)
    # Every run with eps writes its layer-wise analysis beside the adapter.
    for name in ("layerwise_eps.csv", "layerwise_eps.txt", "layerwise_eps.png"):
        assert (result.run_dir / name).is_file(), name
    rows = analyse_run(result.run_dir, tiny_llama)
    # q_proj and v_proj in each of the tiny model's 2 layers.
    assert sorted((r.layer, r.kind) for r in rows) == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    # The modules' norms add up (in squares) to the global ||eps|| the run recorded.
    total = math.sqrt(sum(r.eps_norm**2 for r in rows))
    assert total == pytest.approx(result.summary["perturbation_norm"], rel=1e-5)
    assert all(r.relative_to_base is not None and r.relative_to_base > 0 for r in rows)
    files = write_layer_analysis(rows, tmp_path / "analysis", "tiny")
    assert [f.name for f in files] == ["layerwise_eps.csv", "layerwise_eps.txt", "layerwise_eps.png"]
    assert all(f.stat().st_size > 0 for f in files)
    assert len((tmp_path / "analysis" / "layerwise_eps.csv").read_text().splitlines()) == 1 + len(rows)


def test_a_run_without_perturbation_has_no_layer_analysis(tiny_run_config):
    from panacea_platform.training.loop import run_stage

    result = run_stage(tiny_run_config(defence="sft"), "finetune", track=False, out=lambda line: None)
    with pytest.raises(FileNotFoundError, match="perturbation.safetensors"):
        analyse_run(result.run_dir)
