"""ONNX Runtime engines: export a (possibly pruned) encoder, fuse it, quantize it, run it.

An optimized model is a directory (an "artifact"): `model.onnx`, the tokenizer and config files,
and `gristmill-artifact.json` (variant, digest, options, report). Workers load it like any model
directory; `ClassifierEngine.for_path` picks this engine when the manifest is there.

Measured on a 2-core AVX-512 VNNI CPU, MiniLM-L6, batch 64 (README, "Engine variants"): the
TorchScript exporter plus ONNX Runtime's BERT fusion (Attention, EmbedLayerNormalization,
SkipLayerNormalization, BiasGelu) is what makes int8 pay; the dynamo exporter's graph left
attention unfused and ran int8 slower.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .classify import ClassifierEngine

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
    """Dynamic int8 of the matrix products (MatMul and the fused Attention): int8 weights per output
    channel, activations quantized per batch at run time. The zero-shot head amplifies embedding
    error, so accuracy decides the details (MiniLM, 512 held-out sentences, top-label agreement with
    fp32): per-channel scales 79% -> 93%; leaving the embedding tables in fp32 (ORT would quantize
    them per tensor) 91.8% -> 93.6%, at no measurable speed cost; the file grows from 23 to 59 MB."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def session(path: Path, device: str = "cpu", threads: int | None = None):
    """An InferenceSession on the CUDA provider when asked and available, else the CPU."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
        self.model = None
        self.device = torch.device("cpu")  # ONNX Runtime copies inputs to its own device
        self.autocast = None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        return torch.from_numpy(out).float()
