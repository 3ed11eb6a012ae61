"""int8 and 2:4 variants of torch encoders (kernels/quant.py), checked against fp32 on the CPU."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gristmill.kernels.classify import ClassifierEngine
from gristmill.kernels.quant import (Fp8DynamicLinear, Int8DynamicLinear, Int8RowsLinear, Int8WeightOnlyLinear,
                                     apply_variant, int8_weight_only_matmul, mask_2to4, quantize_per_channel)

ROOT = Path(__file__).resolve().parents[2]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_per_channel_int8_round_trip_is_within_half_a_step():
    w = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("cls,tol", [(Int8WeightOnlyLinear, 0.02), (Int8DynamicLinear, 0.02), (Int8RowsLinear, 0.02),
                                     (Fp8DynamicLinear, 0.06)])  # e4m3 keeps 3 mantissa bits
@pytest.mark.parametrize("rows", [3, 40])  # _int_mm needs > 16 rows: the dynamic layer pads
def test_quantized_linears_match_fp32(cls, tol, rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, rows, 64)
    with torch.no_grad():
        ref = lin(x)
        out = cls(lin)(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = _rel_err(out, ref)
    assert 0 < err < tol  # rounded, and not by much


def test_fp8_rows_scale_to_the_format_range_and_refuse_odd_shapes():
    from gristmill.kernels.quant import FP8_MAX, quantize_fp8_rows
    x = torch.randn(5, 32) * torch.tensor([1e-3, 1, 10, 100, 1e4])[:, None]
    q, s = quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((5,), FP8_MAX))
    assert _rel_err(q.float() * s, x) < 0.05
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8DynamicLinear(torch.nn.Linear(24, 48))


def test_triton_kernel_matches_reference_in_the_interpreter():
    """The Triton kernel itself (not the CPU fallback), run by Triton's interpreter on the CPU; the
    same comparison runs compiled on a GPU in tests/gpu."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from gristmill.kernels.quant import int8_weight_only_matmul, quantize_per_channel
        torch.manual_seed(0)
        for m, n, k in [(5, 48, 64), (70, 40, 96), (33, 64, 40)]:  # ragged edges on every axis
            x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
            q, s = quantize_per_channel(w)
            y = int8_weight_only_matmul(x, q, s, b)
            ref = x @ (q.float() * s[:, None]).T + b
            assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (m, n, k, (y - ref).abs().max())
            assert ((y - (x @ w.T + b)).norm() / (x @ w.T + b).norm()) < 0.02
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_cpu_fallback_equals_dequantized_weights():
    x, w = torch.randn(7, 32), torch.randn(16, 32)
    q, s = quantize_per_channel(w)
    assert torch.allclose(int8_weight_only_matmul(x, q, s), x @ (q.float() * s[:, None]).T, atol=1e-5)


def test_2to4_mask_keeps_the_two_largest_of_every_four():
    w = torch.randn(16, 32)
    m = mask_2to4(w)
    groups, kept = w.reshape(16, 8, 4), m.reshape(16, 8, 4)
    assert ((kept != 0).sum(-1) == 2).all()
    top2 = groups.abs().topk(2, dim=-1).values.sum(-1)
    assert torch.allclose(kept.abs().sum(-1), top2)
    with pytest.raises(ValueError, match="divisible by 4"):
        mask_2to4(torch.randn(4, 6))


@pytest.fixture(scope="module")
def encoder_path(tiny_models_file) -> Path:
    return tiny_models_file.parent / "weights" / "classifier"


def test_apply_variant_rewrites_only_the_transformer_layers(encoder_path):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(encoder_path))
    # 2 layers x (q, k, v, attention output, intermediate, output)
    assert apply_variant(model, quantize="int8-dynamic") == 12
    assert type(model.classifier) is torch.nn.Linear
    with pytest.raises(ValueError, match="quantize must be one of"):
        apply_variant(model, quantize="int4")
    fresh = AutoModelForSequenceClassification.from_pretrained(str(encoder_path))
    # int8-rows keeps q/k/v in the model's precision: 2 layers x (attention output, intermediate, output)
    assert apply_variant(fresh, quantize="int8-rows") == 6
    assert type(fresh.base_model.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with pytest.raises(ValueError, match="do not combine"):
        apply_variant(model, quantize="int8-dynamic", sparsity="2:4")


@pytest.mark.parametrize("kw,suffix", [({"quantize": "int8-weight-only"}, "+int8wo"),
                                       ({"quantize": "int8-dynamic"}, "+w8a8"),
                                       ({"quantize": "int8-rows"}, "+w8a8rows"),
                                       ({"quantize": "fp8-dynamic"}, "+fp8"),
                                       ({"sparsity": "2:4"}, "+sparse24"),
                                       ({"attention": "eager"}, "+attn-eager")])
def test_engine_variants_name_themselves_and_score_near_fp32(encoder_path, kw, suffix):
    texts = ["the quick brown fox", "hello world this is a test", "i will hurt you"]
    ref = ClassifierEngine(encoder_path, max_length=32, cpu_precision="fp32")
    eng = ClassifierEngine(encoder_path, max_length=32, cpu_precision="fp32", **kw)
    assert eng.variant == ref.variant + suffix
    a, b = ref.run(ref.encode(texts)), eng.run(eng.encode(texts))
    assert [list(r) for r in a] == [list(r) for r in b]
    # random tiny weights: int8 stays close; 2:4 without retraining only keeps a valid distribution
    tol = {"int8-weight-only": 0.05, "int8-dynamic": 0.05, "int8-rows": 0.05, "fp8-dynamic": 0.15}.get(kw.get("quantize"), 1.0)
    if "attention" in kw:  # the same products in another kernel
        assert eng.model.config._attn_implementation == kw["attention"] != ref.model.config._attn_implementation
        tol = 1e-5
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x) < tol
    assert all(abs(sum(r.values()) - 1) < 1e-4 for r in b)


def test_fp8_static_scales_come_from_calibration_and_refuse_an_unseen_layer():
    from gristmill.kernels.quant import FP8_MAX, Fp8StaticLinear, calibrate_fp8
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    layer = Fp8StaticLinear(lin)
    x = torch.randn(40, 64) * 3
    assert calibrate_fp8(layer, lambda: layer(x)) == 1
    assert torch.isclose(layer.x_scale * FP8_MAX, x.abs().max())
    with torch.no_grad():
        err = _rel_err(layer(x), lin(x))
    assert 0 < err < 0.06
    with pytest.raises(RuntimeError, match="saw no input"):
        calibrate_fp8(Fp8StaticLinear(lin), lambda: None)


def test_fp8_static_engine_calibrates_itself_and_stays_near_fp32(encoder_path):
    texts = ["the quick brown fox", "hello world this is a test", "i will hurt you"]
    ref = ClassifierEngine(encoder_path, max_length=32, cpu_precision="fp32")
    eng = ClassifierEngine(encoder_path, max_length=32, cpu_precision="fp32", quantize="fp8-static")
    assert eng.variant == ref.variant + "+fp8s"
    scales = [float(m.x_scale) for m in eng.model.modules() if hasattr(m, "x_scale")]
    assert len(scales) == 12 and all(s != 1.0 and s > 0 for s in scales)
    a, b = ref.run(ref.encode(texts)), eng.run(eng.encode(texts))
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x) < 0.15


def test_int8_rows_uses_each_rows_own_asymmetric_range():
    """Against the same weights' exact product, a row's error scales with that row's own range, not
    the batch's: a row of small values beside a row of huge ones keeps its precision; and an
    all-positive (post-GELU-like) row is as precise as the symmetric per-row layer on half its range."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    layer, sym = Int8RowsLinear(lin), Int8DynamicLinear(lin)
    q, scale = quantize_per_channel(lin.weight)
    exact_w = q.float() * scale[:, None]  # weight rounding is common to every scheme: judge activations

    def act_err(m, x):
        with torch.no_grad():
            return _rel_err(m(x), x @ exact_w.T + lin.bias)
    x = torch.randn(40, 256)
    x[0] *= 1000.0  # an outlier token: per tensor, it would take every other row's levels
    small = act_err(layer, x[1:2].repeat(20, 1))
    assert act_err(layer, x) < 0.02 and abs(act_err(layer, x[1:]) - small) < 0.01
    with torch.no_grad():  # each row alone: the outlier row does not change the others' results
        assert torch.allclose(layer(x)[1:], layer(x[1:]), atol=1e-5)
    gelu = torch.nn.functional.gelu(torch.randn(40, 256) * 2)
    assert act_err(layer, gelu) < 0.7 * act_err(sym, gelu)
    # fewer than 17 rows (torch._int_mm's minimum) are padded and cut back
    assert layer(x[:3]).shape == (3, 96)
    assert torch.allclose(layer(x[:3]), layer(x)[:3], atol=1e-5)


def test_a_torch_recipe_serves_the_attention_it_names_and_older_recipes_the_default(encoder_path, tmp_path,
                                                                                   monkeypatch):
    import json

    from gristmill.kernels.onnx_engine import MANIFEST
    from gristmill.kernels.optimize import artifact_engine, torch_recipe_digest, write_torch_recipe
    manifest = write_torch_recipe(encoder_path, tmp_path, quantize="int8-rows", compile=False)
    assert manifest["engine"]["attention"] == "eager" and manifest["variant"].endswith("-attn-eager")
    eng = artifact_engine(tmp_path, max_length=32, cpu_precision="fp32")
    assert eng.attention == "eager" and eng.variant.endswith("+w8a8rows+attn-eager")
    # a recipe written before recipes named their attention
    del manifest["engine"]["attention"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    old = artifact_engine(tmp_path, max_length=32, cpu_precision="fp32")
    assert old.attention is None and old.variant.endswith("+w8a8rows")
    assert old.model.config._attn_implementation != "eager"
    # the attention a recipe runs is part of its digest: a re-run of `optimize` rebuilds and judges
    # the recipes written before
    from gristmill.kernels import optimize
    monkeypatch.setattr(optimize, "TORCH_RECIPE_ATTENTION", {})
    assert manifest["digest"] != torch_recipe_digest(encoder_path, quantize="int8-rows", compile=False)
