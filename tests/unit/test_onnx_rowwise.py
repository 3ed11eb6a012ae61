"""Row-wise int8 for ONNX Runtime (kernels/onnx_rowwise.py): the numerics of one product against a
numpy reference, and a text's scores that do not depend on its batch, on tiny random BERTs."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from gristmill.kernels.classify import ClassifierEngine  # noqa: E402
from gristmill.kernels.onnx_engine import OnnxClassifierEngine, quantize_int8  # noqa: E402
from gristmill.kernels.onnx_rowwise import quantize_int8_rows  # noqa: E402
from gristmill.kernels.optimize import build_artifact  # noqa: E402
from gristmill.producers.registry import DEFAULT_PROTOTYPES  # noqa: E402

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "i will hurt you", "a", "ok then " * 20]


def _one_matmul(tmp_path, w: np.ndarray):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    return tmp_path / "fp32.onnx"


def _session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _reference(x: np.ndarray, w: np.ndarray, *, symmetric: bool) -> np.ndarray:
    """Each row of x on its own grid: symmetric, +-127 steps of max|row| / 127; asymmetric, 255 steps
    over [min, max] widened to hold 0. w int8 per column."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if symmetric:
        scale = np.maximum(np.abs(rows).max(1), 1e-8) / 127
        zp = np.zeros(len(rows))
    else:
        lo, hi = np.minimum(rows.min(1), 0), np.maximum(rows.max(1), 0)
        scale = np.maximum(hi - lo, 1e-8) / 255
        zp = np.round(-lo / scale)
    q = np.clip(np.rint(rows / scale[:, None]) + zp[:, None], -127 if symmetric else 0, 127 if symmetric else 255)
    ws = np.maximum(np.abs(w).max(0), 1e-8) / 127
    wq = np.clip(np.round(w / ws), -127, 127)
    y = ((q - zp[:, None]) * scale[:, None]) @ (wq * ws)
    return y.reshape(*x.shape[:-1], w.shape[1])


@pytest.mark.parametrize("mixed", [True, False])
def test_a_row_wise_product_is_the_reference_and_each_row_its_own(tmp_path, mixed):
    """A lone product's input is neither a GELU's nor shared: symmetric when mixed."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 24)).astype(np.float32)
    src = _one_matmul(tmp_path, w)
    assert quantize_int8_rows(src, tmp_path / "rows.onnx", mixed=mixed) == 1
    quantize_int8(src, tmp_path / "tensor.onnx")
    rows, tensor = _session(tmp_path / "rows.onnx"), _session(tmp_path / "tensor.onnx")
    x = rng.normal(size=(3, 5, 48)).astype(np.float32)
    x[1] = np.abs(x[1]) + 0.5  # a row all above zero: its range starts at 0
    got = rows.run(None, {"x": x})[0]
    assert got.shape == (3, 5, 24)
    np.testing.assert_allclose(got, _reference(x, w, symmetric=mixed), rtol=0, atol=2e-4)
    assert np.abs(got - x @ w).max() < 0.05 * np.abs(x @ w).max()  # and close to fp32
    # a neighbour with an outlier leaves the other rows' results exactly as they were ...
    loud = np.concatenate([x, rng.normal(size=(1, 5, 48)).astype(np.float32) * 50])
    assert np.array_equal(rows.run(None, {"x": loud})[0][:3], got)
    # ... where one range for the tensor moves them (what the test above would catch)
    alone = tensor.run(None, {"x": x})[0]
    assert np.abs(tensor.run(None, {"x": loud})[0][:3] - alone).max() > 1e-3


def test_mixed_rows_keep_an_asymmetric_range_after_gelu_and_for_shared_inputs(tmp_path):
    """x -> three products (shared input, as unfused q/k/v), one -> GELU -> product, one more
    product of a product: asymmetric, asymmetric, symmetric."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(1)
    ws = {f"w{i}": rng.normal(size=(16, 16)).astype(np.float32) for i in range(5)}
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"]) for i in range(3)]
    nodes += [helper.make_node("Gelu", ["h0"], ["g"], domain="com.microsoft"),
              helper.make_node("MatMul", ["g", "w3"], ["y0"]),
              helper.make_node("MatMul", ["h1", "w4"], ["y1"])]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y0", "y1", "h1", "h2")],
                          [numpy_helper.from_array(w, k) for k, w in ws.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    assert quantize_int8_rows(tmp_path / "fp32.onnx", tmp_path / "rows.onnx") == 5
    ops = [n.op_type for n in onnx.load(str(tmp_path / "rows.onnx")).graph.node]
    assert ops.count("ReduceMin") == 4 and ops.count("Abs") == 1  # x's three products and g's; h1's
    x = rng.normal(size=(4, 16)).astype(np.float32)
    y0, y1, h1, h2 = _session(tmp_path / "rows.onnx").run(None, {"x": x})
    np.testing.assert_allclose(h2, _reference(x, ws["w2"], symmetric=False), rtol=0, atol=2e-4)
    np.testing.assert_allclose(y1, _reference(h1, ws["w4"], symmetric=True), rtol=0, atol=1e-3)
    assert np.abs(y1 - _reference(h1, ws["w4"], symmetric=False)).max() > 1e-2  # the two grids differ


def test_an_int8_artifact_scores_a_text_the_same_in_any_batch(weights, tmp_path):
    import onnx
    kw = dict(max_length=32, prototypes=DEFAULT_PROTOTYPES, neutral=["ok"])
    ref = ClassifierEngine(weights / "encoder", cpu_precision="fp32", **kw)
    want = ref.run(ref.encode(TEXTS))
    spread = {}
    for quantize in ("int8", "int8-tensor"):
        out = tmp_path / quantize
        m = build_artifact(weights / "encoder", out, zero_shot=True, quantize=quantize, max_length=32)
        assert m["quantize"] == quantize and ("per token row" in m["quantize_scheme"]) == (quantize == "int8")
        eng = OnnxClassifierEngine(out, **kw)
        ids = eng.encode(TEXTS)
        together = eng.run(ids)
        alone = [eng.run([i])[0] for i in ids]
        reversed_ = eng.run(ids[::-1])[::-1]
        spread[quantize] = max(abs(a[k] - b[k]) for other in (alone, reversed_) for a, b in zip(together, other)
                               for k in a)
        assert max(abs(a[k] - b[k]) for a, b in zip(want, together) for k in a) < 0.2  # near fp32
        if quantize == "int8":  # every product and the attention's q/k/v rewritten: nothing per tensor left
            ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
            assert {"MatMulIntegerToFloat", "MultiHeadAttention", "QuantizeLinear"} <= ops
            assert not ops & {"MatMul", "Attention", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention"}
            # per layer: q/k/v and the product after GELU asymmetric, the other two symmetric
            listed = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
            assert listed.count("ReduceMin") == listed.count("Abs") == listed.count("MatMulIntegerToFloat") / 2 > 0
    # float32 rounding outside the products is all that is left ...
    assert spread["int8"] < 1e-6, spread
    # ... where ONNX Runtime's per-tensor ranges move the scores with the batch
    assert spread["int8-tensor"] > 20 * spread["int8"], spread
