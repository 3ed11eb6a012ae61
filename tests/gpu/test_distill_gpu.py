"""Distilling a student on a GPU: the same training as on the CPU, and an artifact the CPU serves."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from gristmill.kernels.distill import (StudentShape, distill_student, make_student, model_device,  # noqa: E402
                                      teacher_targets)

TEXTS = [f"text number {i}" + " with some words" * (i % 4) for i in range(40)]


def _tiny(weights):
    from transformers import AutoModel, AutoTokenizer
    teacher = AutoModel.from_pretrained(str(weights / "encoder"), attn_implementation="eager").eval()
    shape = StudentShape.for_fraction(0.5, 2)
    return teacher, make_student(teacher, shape), AutoTokenizer.from_pretrained(str(weights / "encoder")), shape


def test_a_student_trained_on_the_gpu_in_fp32_is_the_one_the_cpu_trains(weights):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls, as on the CPU
    head = (torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), torch.zeros(3))
    trained, losses = [], []
    for device in ("cpu", "cuda"):
        teacher, student, tok, shape = _tiny(weights)
        report = distill_student(teacher, student, tok, TEXTS, steps=6, max_length=16, batch=8, head=head,
                                 thresholds=[0.5, 0.4, 0.6], keep_layers=shape.keep_layers, device=device)
        assert model_device(student).type == model_device(teacher).type == "cpu"
        trained.append(teacher_targets(student, tok, TEXTS, 16))  # its pooled embeddings, on the CPU
        losses.append(report.losses[-1])
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    # (Adam's steps amplify rounding where a gradient is near zero: compare what the students give)
    assert (trained[0] - trained[1]).abs().max().item() < 1e-3


def test_a_student_distilled_on_the_gpu_in_bf16_is_written_as_an_artifact_the_cpu_serves(weights, tmp_path):
    from gristmill.kernels.onnx_engine import OnnxClassifierEngine
    from gristmill.kernels.optimize import build_student
    from gristmill.producers.registry import DEFAULT_PROTOTYPES
    manifest = build_student(weights / "encoder", tmp_path / "student", transfer=TEXTS, fraction=0.5, steps=4,
                             head=None, quantize="int8", max_length=32, bf16=True, device="cuda",
                             trained_cache=tmp_path / "students")
    assert manifest["student"]["train_device"] == "cuda" and manifest["student"]["steps"] == 4
    assert all(loss == loss for loss in manifest["student"]["losses"])  # no NaN
    engine = OnnxClassifierEngine(tmp_path / "student", max_length=32, prototypes=DEFAULT_PROTOTYPES, neutral=["ok"])
    assert len(engine.run(engine.encode(TEXTS[:4]))) == 4
