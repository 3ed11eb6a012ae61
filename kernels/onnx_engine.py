"""ONNX Runtime engines: export a (possibly pruned) encoder, fuse it, quantize it, run it.

An optimized model is a directory (an "artifact"): `model.onnx`, the tokenizer and config files,
and `gristmill-artifact.json` (variant, digest, options, report). Workers load it like any model
directory; `ClassifierEngine.for_path` picks this engine when the manifest is there.

Measured on a 2-core AVX-512 VNNI CPU, MiniLM-L6, batch 64 (benchmarks/README.md, "Classifier
precision and engine variants"): the
TorchScript exporter plus ONNX Runtime's BERT fusion (Attention, EmbedLayerNormalization,
SkipLayerNormalization, BiasGelu) is what makes int8 pay; the dynamo exporter's graph left
attention unfused and ran int8 slower.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .classify import ZS_BIAS, ZS_SCALE, ClassifierEngine

log = logging.getLogger(__name__)

MANIFEST = "gristmill-artifact.json"
ONNX_FILE = "model.onnx"


def read_manifest(path: Path) -> dict | None:
    f = Path(path) / MANIFEST
    return json.loads(f.read_text()) if f.is_file() else None


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, logits: bool):
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if self.logits else out.last_hidden_state


def export(model: torch.nn.Module, out: Path, logits: bool) -> Path:
    """fp32 ONNX with dynamic batch and sequence axes. `model` must use eager attention (the
    TorchScript exporter cannot trace SDPA's masks in transformers 5)."""
    ids = torch.ones((2, 8), dtype=torch.long)
    with warnings.catch_warnings():
        # Deliberately the TorchScript exporter (deprecated since torch 2.9): the dynamo exporter's
        # graph defeats ONNX Runtime's attention fusion, and int8 then ran 10% slower.
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, ids, out, logits)
    return out


def _export(model: torch.nn.Module, ids: torch.Tensor, out: Path, logits: bool) -> None:
    torch.onnx.export(_Encoder(model.eval().float().cpu(), logits), (ids, torch.ones_like(ids)), str(out),
                      dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                      output_names=["output"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "output": {0: "batch", 1: "seq"} if not logits else {0: "batch"}})


def fuse(src: Path, out: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """ONNX Runtime's offline BERT fusion; returns the fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model
    m = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1)
    m.save_model_to_file(str(out))
    return {k: v for k, v in m.get_fused_operator_statistics().items() if v}


def quantize_int8(src: Path, out: Path) -> None:
    """ONNX Runtime's dynamic int8 of the matrix products (MatMul and the fused Attention), the
    `int8-tensor` mode: int8 weights per output channel, each activation tensor quantized with one
    range for the whole batch at run time, so a text's scores depend on its batch (the `int8` mode,
    kernels/onnx_rowwise.py, quantizes per row instead). The zero-shot head amplifies embedding
    error, so accuracy decides the details (MiniLM, 512 held-out sentences, top-label agreement with
    fp32): per-channel scales 79% -> 93%; leaving the embedding tables in fp32 (ORT would quantize
    them per tensor) 91.8% -> 93.6%, at no measurable speed cost; the file grows from 23 to 59 MB."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def quantize_int8_blockwise(src: Path, out: Path, block: int = 128) -> None:
    """int8 with finer activation scales: the FFN and attention-output products become ONNX
    Runtime's MatMulNBits (8-bit weights in blocks of `block` along the input, activations
    quantized to int8 per block of each row: accuracy level 4), and the fused Attention's q/k/v
    product dynamic int8. The per-tensor activation scale of plain dynamic int8, one scale for a
    whole batch, is where its error comes from (benchmarks/README.md): per block it nearly goes."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    q = MatMulNBitsQuantizer(str(src), bits=8, block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    tmp = out.with_suffix(".nbits.onnx")
    q.model.save_model_to_file(str(tmp), True)
    quantize_dynamic(str(tmp), str(out), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    tmp.unlink()


def session(path: Path, device: str = "cpu", threads: int | None = None):
    """An InferenceSession on the CUDA provider when asked and available, else the CPU."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's intra-op threads otherwise spin for a while after each run, on cores the
    # process needs next: in a cascade, the torch full model that follows an ONNX student ran at
    # half its speed (the cascade 1.46x faster without spinning, benchmarks/README.md); alone, the
    # session's own speed did not change measurably.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
    return ort.InferenceSession(str(path), so, providers=providers)


class OnnxClassifierEngine(ClassifierEngine):
    """The classifier engine over an ONNX Runtime session of an artifact directory."""

    def _load_backend(self, path: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer
        manifest = read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"{path} has no {MANIFEST}; build one with `gristmill optimize`")
        if manifest["zero_shot"] != self.pooled:  # the key predates trained heads: "an encoder export"
            raise ValueError(f"artifact {path} was built for {'pooled-embedding' if manifest['zero_shot'] else 'sequence'} "
                             f"classification; register it with the matching kind")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.config = AutoConfig.from_pretrained(str(path))
        self.session = session(Path(path) / manifest["onnx"], self.device.type,
                               threads=int(os.environ.get("GRISTMILL_ORT_THREADS", "0")) or None)
        on = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.revision = manifest["digest"]
        self.variant = f"{manifest['variant']}-{on}"
        self._manifest, self._path = manifest, Path(path)
        self.model = None
        self.device = torch.device("cpu")  # ONNX Runtime copies inputs to its own device
        self.autocast = None

    def _own_head(self, registered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A student's own head (kernels/optimize.build_student), where it was fit against the
        registered head the engine is given; else None, and the registered head scores."""
        own = self._manifest.get("head") or {}
        if not own.get("file"):
            return None
        from .heads import load_head
        from .optimize import head_digest
        if own.get("replaces") != head_digest(registered):
            log.warning("artifact %s: its own head was fit against another head than the registered one; "
                        "scoring with the registered head", self._path)
            return None
        w, b, _, _ = load_head(self._path / own["file"])
        return w, b

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._session_run(ids.numpy(), mask.numpy())).float()

    def _session_run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32, copy=False)

    # Around the session, the work per batch (pooling, the head, the sigmoid) runs in numpy, not
    # torch: after each torch op, torch's OpenMP threads spin-wait for the next one and take cores
    # from ONNX Runtime's own thread pool. On 2 cores the int8 artifact ran 403 items/s with torch
    # glue and 474 with numpy (three alternating runs each, MiniLM, batch 64). The torch engine
    # keeps torch; both compute the same scores (tests/unit/test_optimize.py).
    def _pooled(self, batch: list[list[int]]) -> np.ndarray:
        ids, mask = self._pad(batch)
        m = mask.numpy()
        hidden = self._session_run(ids.numpy(), m)
        w = m[..., None].astype(np.float32)
        pooled = (hidden * w).sum(1) / np.maximum(w.sum(1), 1.0)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        return torch.from_numpy(self._pooled(batch))

    def run(self, batch: list[list[int]]) -> list[dict[str, float]]:
        if not batch:
            return []
        if self._head is not None:
            w, b = (t.numpy() for t in self._head)
            scores = _sigmoid(self._pooled(batch) @ w.T + b)
        elif self.pooled:
            emb = self._pooled(batch)
            sims = emb @ self._protos.numpy().T
            owner = self._owner.numpy()
            per_label = np.stack([sims[:, owner == i].max(1, initial=-1.0) for i in range(len(self.labels))], axis=1)
            neutral = (emb @ self._neutral.numpy().T).max(1, keepdims=True)
            scores = _sigmoid(ZS_SCALE * (per_label - neutral) + ZS_BIAS)
        else:
            ids, mask = self._pad(batch)
            logits = self._session_run(ids.numpy(), mask.numpy())
            if self.multi_label:
                scores = _sigmoid(logits)
            else:
                e = np.exp(logits - logits.max(1, keepdims=True))
                scores = e / e.sum(1, keepdims=True)
        return self._rows(scores.astype(np.float32, copy=False).tolist(), len(batch))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x)).astype(np.float32)
