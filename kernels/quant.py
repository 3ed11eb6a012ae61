"""GPU engine variants of a torch encoder: int8 weight-only, int8 dynamic (W8A8), fp8 dynamic, 2:4.

- `Int8WeightOnlyLinear`: int8 weights with one scale per output channel; activations stay in the
  model's dtype. On CUDA a Triton kernel loads int8 tiles, widens them in registers and runs the
  tensor-core dot in bf16/fp16 with fp32 accumulation, so the weights cross memory as int8. It pays
  where weight traffic dominates (small batches, decode); a batch-512 encoder is compute-bound.
- `Int8DynamicLinear`: int8 weights and int8 activations (one scale per row, computed at run time),
  multiplied by `torch._int_mm` (int8 tensor cores on CUDA, oneDNN on CPU).
- `Fp8DynamicLinear`: float8 e4m3 weights (one scale per output channel) and activations (one scale
  per row, at run time), multiplied by `torch._scaled_mm` with row-wise scales: Hopper's fp8 tensor
  cores run at twice the bf16 rate. Elsewhere the same quantize-dequantize numerics run in fp32.
- `Fp8StaticLinear`: the same with one scale per tensor for both operands, the activations' fixed by
  a calibration pass: quantizing is then a pointwise op that torch.compile folds into the op before
  it, where a per-row scale needs its own reduction pass over the activations.
- `sparsify_2to4`: keep the 2 largest of every 4 weights along the input dimension (magnitude, no
  retraining) and, on CUDA in bf16/fp16, store them as a semi-structured sparse tensor (cuSPARSELt
  or CUTLASS kernels).

Without CUDA the int8 weight-only layer runs Triton's interpreter when TRITON_INTERPRET=1 (the
tests do) and otherwise a dequantize-then-matmul reference with the same numerics, so agreement on
real weights is measurable on a CPU.
"""

from __future__ import annotations

import os

import torch
from torch import nn

try:  # Triton ships with CUDA builds of torch; CPU hosts may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SPARSITY_MODES = ("none", "2:4")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~= q * scale[:, None]."""
    scale = (w.detach().float().abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


if triton is not None:
    @triton.jit
    def _int8_wo_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                        sxm, sxk, swn, swk, sym, syn,
                        HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        # grouped launch order: neighbouring programs share x rows in L2
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk,
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            acc += tl.dot(x, w.to(x.dtype))
        # one scale per output channel factors out of the sum over k
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    _CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                         (64, 64, 64, 4, 3), (16, 64, 128, 4, 4), (32, 128, 128, 4, 3)]]
    _int8_wo_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(_int8_wo_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def int8_weight_only_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (q [N, K] int8 * scale[N]).T + bias, in x's dtype."""
    M, K = x.shape
    N = q.shape[0]
    use_triton = triton is not None and (x.is_cuda or _interpreting())
    if not use_triton:
        w = q.to(x.dtype) * scale.to(x.dtype)[:, None]
        return nn.functional.linear(x, w, bias)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    args = (x, q, scale, bias if bias is not None else scale, y, M, N, K,
            x.stride(0), x.stride(1), q.stride(0), q.stride(1), y.stride(0), y.stride(1))
    if x.is_cuda:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        _int8_wo_tuned[grid](*args, HAS_BIAS=bias is not None)
    else:  # the interpreter: one fixed tile shape (autotuning would only re-run the same numpy code)
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32),)
        _int8_wo_kernel[grid](*args, HAS_BIAS=bias is not None, BM=32, BN=32, BK=32, GROUP_M=4)
    return y


class _QuantizedLinear(nn.Module):
    """What every quantized replacement of an nn.Linear shares: the fp32 bias, the feature counts,
    and flattening the leading dimensions; subclasses map [rows, in] to [rows, out] in `_matmul`."""

    keeps: tuple[str, ...] = ()  # attribute names of the encoder linears this kind leaves as they are

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self._matmul(x.reshape(-1, shape[-1])).reshape(*shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)


class Int8WeightOnlyLinear(_QuantizedLinear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_weight_only_matmul(x, self.q, self.scale, self._bias_as(x.dtype))


class Int8DynamicLinear(_QuantizedLinear):
    """int8 x int8 -> int32 products, rescaled per row (activations) and per column (weights)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("qt", q.t())  # [K, N] column-major: the layout cuBLASLt's int8 GEMM takes
        self.register_buffer("scale", scale)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.float()
        rows = x2.shape[0]
        if rows <= 16:  # torch._int_mm needs more than 16 rows
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, 17 - rows))
        xs = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8)
        xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.qt).float() * xs * self.scale[None, :]
        if self.bias is not None:
            y = y + self.bias
        return y[:rows].to(x.dtype)


class Int8RowsLinear(_QuantizedLinear):
    """int8 x int8 -> int32 products with one asymmetric range per activation row: each row of x is
    mapped onto all 256 int8 levels from its own minimum to its own maximum (both widened to hold
    0), weights symmetric per output channel. A zero point of `lo` and a shift of 128 fold into one
    rank-1 term of the epilogue:

        x ~= s * (q + 128) + lo   =>   x @ W.T ~= w_scale * (s * (q @ Wq.T) + (128 s + lo) * Wq.sum(1))

    Asymmetric rows matter after GELU, whose outputs sit in [-0.17, max]: a symmetric range spends
    half its levels on values that never occur. Per-tensor ranges (ONNX Runtime's dynamic int8) are
    set by a batch's outlier tokens and cost most of int8's disagreement with fp32 on the default
    classifier; per row and asymmetric on every product it keeps 99.93% of flags, and 99.95% with
    q/k/v left out as int8-rows leaves them (benchmarks/README.md). Eager, the
    quantize and rescale steps are separate passes and the layer runs slower than fp32;
    torch.compile fuses them around the int8 GEMM (oneDNN on CPUs with VNNI)."""

    # q/k/v stay in the model's precision (bf16 under autocast): their error passes through softmax,
    # and on the default classifier q/k/v alone in int8 (the rest fp32) lost as many flags as either
    # FFN product alone, for three quarters of its FLOPs (benchmarks/README.md).
    keeps = ("query", "key", "value", "q_proj", "k_proj", "v_proj")

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("qt", q.t().contiguous())  # [K, N]
        self.register_buffer("scale", scale)
        self.register_buffer("qsum", q.float().sum(dim=1))  # [N]: the zero point's term

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.float()
        rows = x2.shape[0]
        if rows <= 16:  # torch._int_mm needs more than 16 rows
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, 17 - rows))
        lo = x2.amin(dim=1, keepdim=True).clamp(max=0)
        hi = x2.amax(dim=1, keepdim=True).clamp(min=0)
        s = ((hi - lo) / 255.0).clamp(min=1e-12)
        xq = (torch.round((x2 - lo) / s).clamp(0, 255) - 128).to(torch.int8)
        acc = torch._int_mm(xq, self.qt).float()
        y = (s * acc + (128 * s + lo) * self.qsum[None, :]) * self.scale[None, :]
        if self.bias is not None:
            y = y + self.bias
        return y[:rows].to(x.dtype)


def _fp8_native(x: torch.Tensor) -> bool:
    """torch._scaled_mm with row-wise scales: CUDA devices of compute capability 8.9 or newer."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn per row: x ~= q * scale[:, None]; scale is float32 [rows, 1]."""
    scale = (x.detach().float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class _Fp8Linear(_QuantizedLinear):
    """fp8 weights `qt` [K, N] (column-major, as _scaled_mm takes its second operand) with scale
    `w_scale`; `_fp8_matmul` runs on fp8 tensor cores where there are some, else the same rounding
    in fp32 (how agreement is measured on a CPU)."""

    def __init__(self, linear: nn.Linear):
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"fp8 matmuls need dimensions divisible by 16, not {linear.in_features}x"
                             f"{linear.out_features}")
        super().__init__(linear)

    def _fp8_matmul(self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if _fp8_native(xq):
            return torch._scaled_mm(xq, self.qt, scale_a=x_scale, scale_b=self.w_scale, bias=self._bias_as(dtype),
                                    out_dtype=dtype)
        return self._reference(xq.float() * x_scale, dtype)

    def _reference(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = x.float() @ (self.qt.float() * self.w_scale)
        return (y if self.bias is None else y + self.bias).to(dtype)


class Fp8DynamicLinear(_Fp8Linear):
    """fp8 x fp8 -> fp32 accumulate, rescaled per row (activations) and per column (weights)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scale = quantize_fp8_rows(linear.weight)
        self.register_buffer("qt", q.t())
        self.register_buffer("w_scale", scale.t().contiguous())  # [1, N]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_fp8_rows(x)
        return self._fp8_matmul(xq, xs, x.dtype)


class Fp8StaticLinear(_Fp8Linear):
    """fp8 x fp8 with per-tensor scales; the activation scale comes from `calibrate_fp8`."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        w_scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
        self.register_buffer("qt", (w / w_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).t())
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("x_scale", torch.ones((), device=w.device))
        self.register_buffer("x_amax", torch.zeros((), device=w.device))
        self.calibrating = False

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:  # observe the range; compute with the fp8 weights and unrounded inputs
            self.x_amax = torch.maximum(self.x_amax, x.detach().abs().amax().float())
            return self._reference(x, x.dtype)
        xq = (x.float() / self.x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return self._fp8_matmul(xq, self.x_scale, x.dtype)


# quantize mode -> (replacement layer, tag in the engine variant's name)
QUANTIZED_LAYERS: dict[str, tuple[type[_QuantizedLinear], str]] = {
    "int8-weight-only": (Int8WeightOnlyLinear, "int8wo"),
    "int8-dynamic": (Int8DynamicLinear, "w8a8"),
    "int8-rows": (Int8RowsLinear, "w8a8rows"),
    "fp8-dynamic": (Fp8DynamicLinear, "fp8"),
    "fp8-static": (Fp8StaticLinear, "fp8s"),
}


def calibrate_fp8(model: nn.Module, run) -> int:
    """Fixes every Fp8StaticLinear's activation scale from the largest |input| seen while `run()`
    drives the model over calibration inputs; returns how many layers were calibrated."""
    layers = [m for m in model.modules() if isinstance(m, Fp8StaticLinear)]
    for m in layers:
        m.calibrating = True
        m.x_amax = torch.zeros_like(m.x_amax)
    try:
        with torch.inference_mode():
            run()
    finally:
        for m in layers:
            m.calibrating = False
    for m in layers:
        if float(m.x_amax) <= 0:
            raise RuntimeError("fp8 calibration saw no input on some layer: give it non-empty text")
        m.x_scale = (m.x_amax / FP8_MAX).clone()
    return len(layers)


def mask_2to4(w: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive ones along the input dimension."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs the input dimension divisible by 4, not {k}")
    groups = w.detach().abs().reshape(n, k // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    return w * keep.reshape(n, k).to(w.dtype)


def _encoder_linears(model: nn.Module):
    """(parent, attribute, linear) for every nn.Linear inside the transformer layers: the matmuls
    that carry the FLOPs. Embeddings, poolers and classification heads stay as they are."""
    for name, module in model.named_modules():
        if ".layer." not in f".{name}." and ".layers." not in f".{name}.":
            continue
        for attr, child in module.named_children():
            if type(child) is nn.Linear:
                yield module, attr, child


def apply_variant(model: nn.Module, quantize: str = "none", sparsity: str = "none") -> int:
    """Rewrites the model's encoder linears in place; returns how many were rewritten."""
    if quantize != "none" and quantize not in QUANTIZED_LAYERS:
        raise ValueError(f"quantize must be one of none, {', '.join(QUANTIZED_LAYERS)}, not {quantize!r}")
    if sparsity not in SPARSITY_MODES:
        raise ValueError(f"sparsity must be one of {', '.join(SPARSITY_MODES)}, not {sparsity!r}")
    if quantize != "none" and sparsity != "none":
        raise ValueError(f"quantization ({quantize}) and 2:4 sparsity do not combine here; pick one")
    n = 0
    kept = QUANTIZED_LAYERS[quantize][0].keeps if quantize != "none" else ()
    for parent, attr, lin in list(_encoder_linears(model)):
        if attr in kept:
            continue
        if sparsity == "2:4":
            w = mask_2to4(lin.weight.data)
            if w.is_cuda and w.dtype in (torch.float16, torch.bfloat16):
                from torch.sparse import to_sparse_semi_structured
                w = to_sparse_semi_structured(w)
            lin.weight = nn.Parameter(w, requires_grad=False)
        elif quantize != "none":
            setattr(parent, attr, QUANTIZED_LAYERS[quantize][0](lin).to(lin.weight.device))
        else:
            continue
        n += 1
    return n


def variant_suffix(quantize: str, sparsity: str, compiled: bool | str, attention: str | None = None) -> str:
    parts = [] if quantize == "none" else [QUANTIZED_LAYERS[quantize][1]]
    parts += ["sparse24"] if sparsity == "2:4" else []
    parts += [] if not compiled else ["compiled"] if compiled is True else [f"compiled-{compiled}"]
    parts += [f"attn-{attention}"] if attention else []
    return "".join(f"+{p}" for p in parts)
