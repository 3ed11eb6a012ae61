"""The GPU variants' kernels, compiled and run on CUDA, against float64 references on fresh inputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from gristmill.kernels.quant import (Fp8DynamicLinear, Int8DynamicLinear, Int8RowsLinear,  # noqa: E402
                                     Int8WeightOnlyLinear, apply_variant, int8_weight_only_matmul,
                                     quantize_per_channel)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("m,n,k", [(1, 384, 384), (77, 1536, 384), (4096, 384, 1536), (33, 40, 72)])
def test_triton_int8_weight_only_kernel_matches_dequantized_reference(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w, b = torch.randn(n, k, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)
    q, s = quantize_per_channel(w)
    y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    y.copy_(int8_weight_only_matmul(x, q, s, b.bfloat16()))
    ref = x.double() @ (q.double() * s.double()[:, None]).T + b.bfloat16().double()
    assert not y.isnan().any()
    assert _rel(y, ref) < 1e-2  # bf16 operands and output


@pytest.mark.parametrize("cls", [Int8WeightOnlyLinear, Int8DynamicLinear, Int8RowsLinear, Fp8DynamicLinear])
def test_quantized_linears_stay_near_fp64(cls):
    if cls is Fp8DynamicLinear and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9+")
    lin = torch.nn.Linear(384, 1536).cuda()
    x = torch.randn(4, 128, 384, device="cuda")
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    y = cls(lin).cuda()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # int8 rounding ~0.5%, fp8 e4m3 (3 mantissa bits) ~3% relative per operand
    assert _rel(y, ref) < (0.06 if cls is Fp8DynamicLinear else 0.02)


def test_2to4_semi_structured_equals_the_masked_dense_layer():
    from gristmill.kernels.quant import mask_2to4
    model = torch.nn.Sequential()
    layer = torch.nn.Module()
    layer.dense = torch.nn.Linear(384, 1536)
    model.add_module("layer", torch.nn.ModuleList([layer]))
    model = model.cuda().bfloat16()
    dense_masked = mask_2to4(layer.dense.weight.data.float())
    x = torch.randn(512, 384, device="cuda").bfloat16()
    assert apply_variant(model, sparsity="2:4") == 1
    y = model.layer[0].dense(x)
    ref = x.double() @ dense_masked.double().T + layer.dense.bias.double()
    assert _rel(y, ref) < 1e-2


def test_fp8_static_after_calibration_stays_near_fp64():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9+")
    from gristmill.kernels.quant import Fp8StaticLinear, calibrate_fp8
    lin = torch.nn.Linear(384, 1536).cuda()
    layer = Fp8StaticLinear(lin).cuda()
    calibrate_fp8(layer, lambda: layer(torch.randn(256, 384, device="cuda").bfloat16()))
    x = torch.randn(4, 128, 384, device="cuda")
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < 0.08
