"""int8 for ONNX Runtime with one activation range per token row: scores that do not depend on the batch.

ONNX Runtime's dynamic int8 (`quantize_dynamic`: DynamicQuantizeMatMul, QAttention) quantizes each
activation tensor with one range for the whole batch, padding included. A text's scores then
depend on the texts it is batched with: scoring 1,222 built-in held-out texts again in another
order, 64 to a batch, changed 0.32% of flags and 3.7% of texts' decisions (benchmarks/README.md).
Here each row (one token's activations) gets its own range, so a row's result depends on that row
alone, and most of the per-tensor range's error goes too.

The rewrite works on ONNX Runtime's fused BERT graph (kernels/onnx_engine.fuse), for every
`MatMul` whose weight is a constant, and every fused `Attention`. A row's range is asymmetric where
the input is skewed or its error costs decisions (after GELU, and the q/k/v input: `_asymmetric_inputs`):

    x [.., K] -> rows [M, K] -> QuantizeLinear(scale[M], zero_point[M], axis 0)      uint8
      -> MatMulIntegerToFloat(weight int8 [K, N], one scale per output column)  sum_k q_mk w_kn * ws_n
      -> * scale_m - (scale_m * zero_point_m) (x) (ws_n * sum_k w_kn)              the row's zero point out
      -> [.., N]

and symmetric elsewhere (the attention's output and the FFN's input), where the zero point is
128 for every row, so the product takes it out itself and only the row's scale is left to apply:

    rows -> QuantizeLinear(max|row| / 127, 128, axis 0) -> MatMulIntegerToFloat(.., a_zero_point 128) -> * scale_m

(uint8 with 128 rather than int8: ONNX Runtime's int8 x int8 product is 3x slower on x86.)
`Attention` (q/k/v from one packed weight) becomes the asymmetric product, split in three, into
`MultiHeadAttention` with the same bias, mask and head count. Weights are int8 per output column,
symmetric. Gemm and anything else stays fp32. On the moderation model (2 AVX-512 VNNI cores, the
same texts, timed in turns): 99.94% of flags and 99.26% of texts as fp32 at 1.97-2.11x, against
99.93% / 99.18% at 1.91-1.99x with every row asymmetric and 99.74% / 96.81% at 2.39x per tensor.
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
        self.inv127 = self.const("rowq/inv127", np.array(1 / 127, np.float32))
        self.mid = self.const("rowq/mid", np.array(128.0, np.float32))
        self.zp_none = self.const("rowq/u8zero", np.array(0, np.uint8))
        self.zp_mid = self.const("rowq/u8mid", np.array(128, np.uint8))
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

    def matmul(self, x: str, w: np.ndarray, y: str, *, symmetric: bool) -> None:
        """y = x @ w with x quantized per row and w per output column (int8). `symmetric`: the row's
        range is +-max|x| (no zero point); otherwise [min, max] widened to hold 0, on the uint8 grid."""
        from onnx import TensorProto
        p = f"rowq{self.count}/"
        self.count += 1
        k, n = w.shape
        w_scale = np.maximum(np.abs(w).max(0), 1e-8) / 127
        wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        wq_name = self.const(p + "w", wq)
        ws_name = self.const(p + "w_scale", w_scale.astype(np.float32))
        rows_shape = self.const(p + "rows", np.array([-1, k], np.int64))
        width = self.const(p + "n", np.array([n], np.int64))
        self.node("Shape", [x], [p + "x_shape"])
        self.node("Slice", [p + "x_shape", self.axis0, self.last], [p + "lead"])
        self.node("Concat", [p + "lead", width], [p + "y_shape"], axis=0)
        self.node("Reshape", [x, rows_shape], [p + "x2"])
        if symmetric:
            # the int8 grid +-127 * scale, stored as uint8 + 128 (u8 x s8 is the products' fast path)
            self.node("Abs", [p + "x2"], [p + "abs"])
            self.node("ReduceMax", [p + "abs"], [p + "amax0"], axes=[1], keepdims=0)
            self.node("Max", [p + "amax0", self.eps], [p + "amax"])
            self.node("Mul", [p + "amax", self.inv127], [p + "scale"])
            self.node("Mul", [p + "scale", self.zero], [p + "zp_f0"])
            self.node("Add", [p + "zp_f0", self.mid], [p + "zp_f"])
            self.node("Cast", [p + "zp_f"], [p + "zp"], to=TensorProto.UINT8)
            self.node("QuantizeLinear", [p + "x2", p + "scale", p + "zp"], [p + "q"], axis=0)
            self.node("MatMulIntegerToFloat", [p + "q", wq_name, self.one, ws_name, self.zp_mid], [p + "acc"])
            self.node("Unsqueeze", [p + "scale", self.axis1], [p + "scale_col"])
            self.node("Mul", [p + "acc", p + "scale_col"], [p + "y2"])
        else:
            # what a row's zero point adds to each output column: ws_n * sum_k wq_kn
            zp_cols = self.const(p + "w_zp_cols", (w_scale * wq.astype(np.float32).sum(0)).astype(np.float32))
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
        self.matmul(inputs[0], w, p + "qkv", symmetric=False)
        self.node("Split", [p + "qkv", self.const(p + "split", np.array([d, d, d], np.int64))],
                  [p + "q", p + "k", p + "v"], axis=-1)
        self.node("MultiHeadAttention", [p + "q", p + "k", p + "v", inputs[2], inputs[3]], list(node.output), **attrs)
        return True


GELU_OPS = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu"}


def _asymmetric_inputs(graph, weight_of) -> set[str]:
    """The inputs of constant-weight products whose rows keep an asymmetric range: a GELU's output
    (bounded below near -0.17, so a symmetric grid would leave half its codes unused) and an input
    that q/k/v share (a fused Attention's or, unfused, one read by several products). Measured on
    the moderation model: q/k/v symmetric lost 0.65% of texts' decisions; the attention's output
    and the FFN's input symmetric lost none and were faster (benchmarks/README.md)."""
    producer = {o: n for n in graph.node for o in n.output}

    def from_gelu(name: str, depth: int = 3) -> bool:
        node = producer.get(name)
        if node is None or depth == 0:
            return False
        if node.op_type in GELU_OPS or node.op_type in ("Erf", "Tanh"):
            return True
        return node.op_type == "Mul" and any(from_gelu(i, depth - 1) for i in node.input)

    readers: dict[str, int] = {}
    for n in graph.node:
        if n.op_type == "MatMul" and weight_of(n.input[1]) is not None:
            readers[n.input[0]] = readers.get(n.input[0], 0) + 1
    return {x for x, count in readers.items() if count > 1 or from_gelu(x)}


def quantize_int8_rows(src: Path, out: Path, *, mixed: bool = True) -> int:
    """Rewrite the fused fp32 ONNX model at `src` to row-wise int8 at `out`; returns how many
    matrix products were quantized. `mixed`: symmetric rows where that costs nothing
    (`_asymmetric_inputs`), asymmetric elsewhere; False: asymmetric everywhere."""
    import onnx
    model = onnx.load(str(src))
    r = _Rewriter(model.graph)
    asymmetric = _asymmetric_inputs(model.graph, r.weight) if mixed else None
    for node in model.graph.node:
        w = r.weight(node.input[1]) if node.op_type == "MatMul" else None
        if w is not None:
            r.matmul(node.input[0], w, node.output[0],
                     symmetric=asymmetric is not None and node.input[0] not in asymmetric)
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
