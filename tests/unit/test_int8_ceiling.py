"""The int8 speed-of-light benchmark: the products it counts, and the bounds it derives."""

import pytest
import torch
from transformers import BertConfig, BertModel

from benchmarks.int8_ceiling import ceiling, gemm_calls, gemm_shapes, in_turns, needed_speed


def test_needed_speed_prices_the_escalated_inputs_at_fp32():
    # 3x with 5% escalated: 1/3 of fp32's time, 0.05 of it spent on the full model
    assert needed_speed(3.0, 0.05) == pytest.approx(1 / (1 / 3 - 0.05))
    assert needed_speed(2.0, 0.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="costs more"):
        needed_speed(3.0, 0.4)


def test_gemm_shapes_records_every_encoder_linear_of_a_forward():
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        shapes = gemm_shapes(model, lambda: model(input_ids=ids))
    # per layer: q, k, v, attention output (32 -> 32), FFN in (32 -> 64), FFN out (64 -> 32); the pooler is not a layer's
    per_layer = [(21, 32, 32)] * 4 + [(21, 32, 64), (21, 64, 32)]
    assert sorted(shapes) == sorted(per_layer * 2)
    assert not model.encoder.layer[0].attention.self.query._forward_hooks  # hooks removed
    calls = gemm_calls(shapes)
    # one call per distinct shape, weighted by how often the forward made it
    assert sorted(w for _, w in calls["gemm_int8"]) == [2, 2, 8]
    seconds = in_turns(calls, rounds=1)
    assert seconds["gemm_fp32"] > 0 and seconds["gemm_int8"] > 0


def test_in_turns_weights_each_calls_least_time():
    ran = []
    seconds = in_turns({"a": [(lambda: ran.append("a"), 3)], "b": [(lambda: ran.append("b"), 1)] * 2}, rounds=2)
    # one untimed run of each call, then the measures take turns
    assert ran == ["a", "b", "b", "a", "b", "b", "a", "b", "b"]
    assert seconds["a"] >= 0 and seconds["b"] >= 0


def test_ceiling_bounds_follow_from_the_measured_seconds():
    seconds = {"tokenize": 0.1, "fp32": 6.0, "gemm_fp32": 4.0, "gemm_int8": 1.0, "fp32_compiled": 5.0, "int8_rows": 3.0}
    figures, rows = ceiling(seconds, target=3.0, escalated=0.05)
    base = 6.1
    assert figures["bound_rest_as_fp32"] == round(base / (0.1 + 2.0 + 1.0), 2)
    assert figures["bound_rest_fused"] == round(base / (0.1 + 1.0 + 1.0), 2)
    assert figures["bound_rest_free"] == round(base / 1.1, 2)
    assert figures["int8_rows_vs_fp32"] == round(base / 3.1, 2)
    assert figures["rest_budget_seconds"] == pytest.approx(base / needed_speed(3.0, 0.05) - 1.1, abs=1e-4)
    assert len(rows) == 10 and rows[-1][2] == f"{needed_speed(3.0, 0.05):.2f}x"
    # without the compiled engines, their rows and figures are left out
    figures, rows = ceiling({k: v for k, v in seconds.items() if k not in ("fp32_compiled", "int8_rows")}, 3.0, 0.05)
    assert "bound_rest_fused" not in figures and "int8_rows_vs_fp32" not in figures and len(rows) == 7
