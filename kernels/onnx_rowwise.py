"""int8 for ONNX Runtime with one activation range per token row: scores that do not depend on the batch.

ONNX Runtime's dynamic int8 (`quantize_dynamic`: DynamicQuantizeMatMul, QAttention) quantizes each
activation tensor with one range for the whole batch, padding included. A text's scores then
depend on the texts it is batched with: scoring 1,222 built-in held-out texts again in another
order, 64 to a batch, changed 0.32% of flags and 3.7% of texts' decisions (benchmarks/README.md).
Here each row (one token's activations) gets its own asymmetric uint8 range, so a row's result
depends on that row alone, and most of the per-tensor range's error goes too (on the same texts,
99.93% of flags and 99.18% of texts as fp32 against 99.74% and 96.81%), for a quarter of the speed
(1.78x fp32 against 2.35x, MiniLM on 2 AVX-512 VNNI cores; the extra passes over each product's
input and output are not fused into it).

The rewrite works on ONNX Runtime's fused BERT graph (kernels/onnx_engine.fuse), for every
`MatMul` whose weight is a constant, and every fused `Attention`:

    x [.., K] -> rows [M, K] -> QuantizeLinear(scale[M], zero_point[M], axis 0)      uint8
      -> MatMulIntegerToFloat(weight int8 [K, N], one scale per output column)  sum_k q_mk w_kn * ws_n
      -> * scale_m - (scale_m * zero_point_m) (x) (ws_n * sum_k w_kn)              the row's zero point out
      -> [.., N]

`Attention` (q/k/v from one packed weight) becomes that product, split in three, into
`MultiHeadAttention` with the same bias, mask and head count. Weights are int8 per output column,
symmetric. Gemm and anything else stays fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ATTENTION_ATTRIBUTES = {"num_heads", "mask_filter_value", "scale"}


class _Rewriter:
    def __init__(self, graph):
        from onnx import numpy_helper
        self._np = numpy_helper
        self.constants = {i.name: i for i in graph.initializer}
        self.nodes: list = []
        self.added: list = []
        self.count = 0
        self.eps = self.const("rowq/eps", np.array(1e-8, np.float32))
        self.zero = self.const("rowq/zero", np.array(0.0, np.float32))
        self.one = self.const("rowq/one", np.array(1.0, np.float32))
        self.inv255 = self.const("rowq/inv255", np.array(1 / 255, np.float32))
        self.zp_none = self.const("rowq/u8zero", np.array(0, np.uint8))
        self.axis0 = self.const("rowq/axis0", np.array([0], np.int64))
        self.axis1 = self.const("rowq/axis1", np.array([1], np.int64))
        self.last = self.const("rowq/last", np.array([-1], np.int64))

    def const(self, name: str, value: np.ndarray) -> str:
        self.added.append(self._np.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str) -> np.ndarray | None:
        t = self.constants.get(name)
        if t is None:
            return None
        w = self._np.to_array(t)
        return w.astype(np.float32) if w.ndim == 2 and w.dtype == np.float32 else None

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        from onnx import helper
        domain = "com.microsoft" if op in ("MatMulIntegerToFloat", "MultiHeadAttention") else ""
        self.nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))

    def matmul(self, x: str, w: np.ndarray, y: str) -> None:
        """y = x @ w with x quantized per row (asymmetric uint8) and w per output column (int8)."""
        from onnx import TensorProto
        p = f"rowq{self.count}/"
        self.count += 1
        k, n = w.shape
        w_scale = np.maximum(np.abs(w).max(0), 1e-8) / 127
        wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        wq_name = self.const(p + "w", wq)
        ws_name = self.const(p + "w_scale", w_scale.astype(np.float32))
        # what a row's zero point adds to each output column: ws_n * sum_k wq_kn
        zp_cols = self.const(p + "w_zp_cols", (w_scale * wq.astype(np.float32).sum(0)).astype(np.float32))
        rows_shape = self.const(p + "rows", np.array([-1, k], np.int64))
        width = self.const(p + "n", np.array([n], np.int64))
        self.node("Shape", [x], [p + "x_shape"])
        self.node("Slice", [p + "x_shape", self.axis0, self.last], [p + "lead"])
        self.node("Concat", [p + "lead", width], [p + "y_shape"], axis=0)
        self.node("Reshape", [x, rows_shape], [p + "x2"])
        # each row's range, widened to hold 0 (as DynamicQuantizeLinear widens a tensor's)
        self.node("ReduceMax", [p + "x2"], [p + "hi0"], axes=[1], keepdims=0)
        self.node("ReduceMin", [p + "x2"], [p + "lo0"], axes=[1], keepdims=0)
        self.node("Max", [p + "hi0", self.zero], [p + "hi"])
        self.node("Min", [p + "lo0", self.zero], [p + "lo"])
        self.node("Sub", [p + "hi", p + "lo"], [p + "span0"])
        self.node("Max", [p + "span0", self.eps], [p + "span"])
        self.node("Mul", [p + "span", self.inv255], [p + "scale"])
        self.node("Div", [p + "lo", p + "scale"], [p + "zp_neg"])
        self.node("Neg", [p + "zp_neg"], [p + "zp_f0"])
        self.node("Round", [p + "zp_f0"], [p + "zp_f"])
        self.node("Cast", [p + "zp_f"], [p + "zp"], to=TensorProto.UINT8)
        self.node("QuantizeLinear", [p + "x2", p + "scale", p + "zp"], [p + "q"], axis=0)
        self.node("MatMulIntegerToFloat", [p + "q", wq_name, self.one, ws_name, self.zp_none], [p + "acc"])
        self.node("Unsqueeze", [p + "scale", self.axis1], [p + "scale_col"])
        self.node("Mul", [p + "scale", p + "zp_f"], [p + "shift0"])
        self.node("Unsqueeze", [p + "shift0", self.axis1], [p + "shift_col"])
        self.node("Mul", [p + "shift_col", zp_cols], [p + "shift"])
        self.node("Mul", [p + "acc", p + "scale_col"], [p + "scaled"])
        self.node("Sub", [p + "scaled", p + "shift"], [p + "y2"])
        self.node("Reshape", [p + "y2", p + "y_shape"], [y])

    def attention(self, node) -> bool:
        """Attention(x, qkv weight, bias, mask) as the row-quantized q/k/v product and
        MultiHeadAttention; False (left as it is) where the node uses more than that."""
        from onnx import helper
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * (4 - len(node.input))
        w, bias = self.weight(inputs[1]), self.constants.get(inputs[2])
        if set(attrs) - ATTENTION_ATTRIBUTES or any(inputs[4:]) or w is None or bias is None or w.shape[1] % 3:
            return False
        p = f"rowq{self.count}/attention/"
        d = w.shape[1] // 3
        self.matmul(inputs[0], w, p + "qkv")
        self.node("Split", [p + "qkv", self.const(p + "split", np.array([d, d, d], np.int64))],
                  [p + "q", p + "k", p + "v"], axis=-1)
        self.node("MultiHeadAttention", [p + "q", p + "k", p + "v", inputs[2], inputs[3]], list(node.output), **attrs)
        return True


def quantize_int8_rows(src: Path, out: Path) -> int:
    """Rewrite the fused fp32 ONNX model at `src` to row-wise int8 at `out`; returns how many
    matrix products were quantized."""
    import onnx
    model = onnx.load(str(src))
    r = _Rewriter(model.graph)
    for node in model.graph.node:
        w = r.weight(node.input[1]) if node.op_type == "MatMul" else None
        if w is not None:
            r.matmul(node.input[0], w, node.output[0])
        elif not (node.op_type == "Attention" and r.attention(node)):
            r.nodes.append(node)
    used = {i for n in r.nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.node[:]
    model.graph.node.extend(r.nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + [i for i in r.added if i.name in used])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out))
    return r.count
