"""Build an optimized classifier artifact (prune -> export -> fuse -> quantize) and judge it.

Pure compute: callers pass texts and label facts; `workers/optimize.py` is the command around it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import onnx_engine
from .loading import weights_revision
from .onnx_rowwise import quantize_int8_rows

if TYPE_CHECKING:
    from .distill import DistillReport

FORMAT_VERSION = 3  # 2: "int8" artifacts quantize activations per token row (kernels/onnx_rowwise.py); 3: and
# symmetric rows where that costs no accuracy


class OnnxQuantizer(NamedTuple):
    rewrite: Callable[[Path, Path], object]  # (fused fp32 model, quantized model out)
    scheme: str  # what the artifact's manifest says of it (`quantize_scheme`)


# each ONNX artifact mode (None: fp32)
ONNX_QUANTIZE = {
    "int8": OnnxQuantizer(quantize_int8_rows,
                          "int8 with one activation range per token row (asymmetric after GELU and for q/k/v, "
                          "symmetric elsewhere): scores independent of the batch"),
    "int8-tensor": OnnxQuantizer(onnx_engine.quantize_int8, "ONNX Runtime dynamic int8, one activation range per "
                                 "tensor: scores depend on the batch"),
    "int8-block": OnnxQuantizer(onnx_engine.quantize_int8_blockwise, "8-bit weights and activations per block of "
                                "128 (MatMulNBits), attention per tensor"),
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                    "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def artifact_digest(src: Path, *, zero_shot: bool, quantize: str | None, prune: float, calibration: list[str],
                    max_length: int, distill_steps: int = 0) -> str:
    """Names an artifact by everything that shapes it, so a worker or a re-run reuses it."""
    h = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, "src": weights_revision(src), "zs": zero_shot,
                                   "q": quantize, "p": prune, "len": max_length,
                                   "d": distill_steps if prune else 0}, sort_keys=True).encode())
    for t in calibration if prune else []:
        h.update(t.encode() + b"\n")
    return h.hexdigest()[:16]


def variant_name(quantize: str | None, prune: float) -> str:
    v = "ort-" + (quantize or "fp32")
    return v + (f"-pruned{round(prune * 100)}" if prune else "")


def build_artifact(src: Path, out: Path, *, zero_shot: bool, quantize: str | None = "int8", prune: float = 0.0,
                   calibration: list[str] | None = None, max_length: int = 128, distill_steps: int = 0) -> dict:
    """Write an artifact directory at `out` (replaced if present). Returns its manifest."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    if quantize is not None and quantize not in ONNX_QUANTIZE:
        raise ValueError(f"quantize: {', '.join(map(repr, ONNX_QUANTIZE))} or None, not {quantize!r}")
    calibration = calibration or []
    if prune and not calibration:
        raise ValueError("pruning needs calibration texts")
    cls = AutoModel if zero_shot else AutoModelForSequenceClassification
    model = cls.from_pretrained(str(src), attn_implementation="eager", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    pruned, losses = None, []
    if prune:
        import copy

        from .prune import calibration_batches, distill
        from .prune import prune as prune_model
        batches = calibration_batches(tok, calibration, max_length)
        teacher = copy.deepcopy(model) if distill_steps else None
        pruned = prune_model(model, batches, prune)
        if teacher is not None:
            losses = distill(model, teacher, batches, distill_steps)
    return write_onnx_artifact(model, src, out, zero_shot=zero_shot, quantize=quantize, manifest={
        "variant": variant_name(quantize, prune), "prune": prune,
        "digest": artifact_digest(src, zero_shot=zero_shot, quantize=quantize, prune=prune,
                                  calibration=calibration, max_length=max_length, distill_steps=distill_steps),
        "distill_steps": distill_steps if prune else 0, "distill_losses": losses, "max_length": max_length,
        "pruned": None if pruned is None else pruned.__dict__})


def write_onnx_artifact(model, src: Path, out: Path, *, zero_shot: bool, quantize: str | None,
                        manifest: dict) -> dict:
    """Export `model` (an encoder, or a sequence classifier when not `zero_shot`) to ONNX, fuse it,
    quantize it, and write it with `src`'s tokenizer and config and its manifest at `out`."""
    layer0 = (model if zero_shot else model.base_model).encoder.layer[0].attention.self
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = onnx_engine.export(model, Path(tmp) / "raw.onnx", logits=not zero_shot)
        fused_ops = onnx_engine.fuse(raw, Path(tmp) / "fused.onnx", layer0.num_attention_heads,
                                     layer0.num_attention_heads * layer0.attention_head_size)
        final = Path(tmp) / "fused.onnx"
        if quantize is not None:
            quantized = Path(tmp) / "int8.onnx"
            ONNX_QUANTIZE[quantize].rewrite(final, quantized)
            final = quantized
        for f in out.glob("*.onnx*"):
            f.unlink()
        shutil.move(str(final), out / onnx_engine.ONNX_FILE)
    for name in _TOKENIZER_FILES + ("config.json",):
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, out / name)
    model.config.save_pretrained(out)  # a student's config says its own layer count
    full = {"format": FORMAT_VERSION, "onnx": onnx_engine.ONNX_FILE, "zero_shot": zero_shot, "quantize": quantize,
            "quantize_scheme": ONNX_QUANTIZE[quantize].scheme if quantize is not None else "none: fp32",
            "source": str(src), "source_revision": weights_revision(src), "fused_ops": fused_ops,
            "build_s": round(time.perf_counter() - t0, 1), "size_bytes": (out / onnx_engine.ONNX_FILE).stat().st_size,
            **manifest}
    (out / onnx_engine.MANIFEST).write_text(json.dumps(full, indent=2))
    return full


# The manifest kind of an artifact that is a recipe for the torch engine (a quantize mode, compiled,
# over the source weights), not an ONNX file: the CPU's int8-rows runs there, through Inductor.
TORCH_RECIPE = "torch"
TORCH_QUANTIZE = ("int8-rows",)
# The attention a torch recipe runs. Compiled int8-rows on a CPU ran 8-15% faster with transformers'
# eager attention (matmuls and a softmax that Inductor fuses) than with its default, the CPU's
# flash-attention kernel, which took a fifth of the forward on short texts; and a text's scores no
# longer moved with the texts batched beside it (benchmarks/README.md, "Attention for compiled
# int8_rows"). Recipes written before carry no attention and keep the default.
TORCH_RECIPE_ATTENTION = {"int8-rows": "eager"}


def torch_recipe_engine(quantize: str, compile: bool = True) -> dict:
    """The torch engine's arguments a recipe of `quantize` stores, and serves with."""
    return {"quantize": quantize, "compile": compile, "attention": TORCH_RECIPE_ATTENTION.get(quantize)}


def torch_recipe_digest(src: Path, *, quantize: str, compile: bool) -> str:
    return hashlib.sha256(json.dumps({"v": FORMAT_VERSION, "kind": TORCH_RECIPE, "src": weights_revision(src),
                                      "engine": torch_recipe_engine(quantize, compile)},
                                     sort_keys=True).encode()).hexdigest()[:16]


def write_torch_recipe(src: Path, out: Path, *, quantize: str, compile: bool = True) -> dict:
    """A torch-engine artifact at `out`: the manifest alone, naming the source weights and how the
    engine runs them. Returns its manifest (the caller adds the report)."""
    if quantize not in TORCH_QUANTIZE:
        raise ValueError(f"a torch recipe quantizes with {', '.join(TORCH_QUANTIZE)}, not {quantize!r}")
    out.mkdir(parents=True, exist_ok=True)
    engine = torch_recipe_engine(quantize, compile)
    variant = f"torch-{quantize}" + ("-compiled" * compile) + (f"-attn-{engine['attention']}" if engine["attention"] else "")
    manifest = {"format": FORMAT_VERSION, "kind": TORCH_RECIPE, "variant": variant,
                "source": str(src), "source_revision": weights_revision(src), "quantize": quantize,
                "engine": engine,
                "digest": torch_recipe_digest(src, quantize=quantize, compile=compile)}
    (out / onnx_engine.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def artifact_engine(path: Path, **kw):
    """The engine of an artifact directory (not a cascade): ONNX Runtime over its model.onnx, or,
    for a torch recipe, the torch engine over the source weights as the recipe says."""
    manifest = onnx_engine.read_manifest(path)
    if manifest is not None and manifest.get("kind") == TORCH_RECIPE:
        from .classify import ClassifierEngine
        engine = manifest["engine"]
        return ClassifierEngine(Path(manifest["source"]), quantize=engine["quantize"], compile=engine["compile"],
                                attention=engine.get("attention"), **kw)
    return onnx_engine.OnnxClassifierEngine(path, **kw)


STUDENT_RECIPE = 3  # bumped when distill_student's losses or sampling, or the head refit, change
STUDENT_HEAD_FILE = "head.safetensors"


def head_digest(weight: torch.Tensor) -> str:
    """Names a linear head by its weights: what a student's own head says it replaces."""
    return hashlib.sha256(weight.float().contiguous().numpy().tobytes()).hexdigest()[:12]


def _student_hash(src: Path, transfer: list[str], head: tuple[torch.Tensor, torch.Tensor] | None,
                  fields: dict) -> "hashlib._Hash":
    h = hashlib.sha256(json.dumps({"kind": "student", "recipe": STUDENT_RECIPE, "src": weights_revision(src),
                                   "head": "" if head is None else head_digest(head[0]), **fields},
                                  sort_keys=True).encode())
    for t in transfer:
        h.update(t.encode() + b"\n")
    return h


def student_digest(src: Path, *, transfer: list[str], fraction: float, steps: int, quantize: str | None,
                   max_length: int, head: tuple[torch.Tensor, torch.Tensor] | None,
                   thresholds: list[float] | None = None, head_texts: list[str] | None = None) -> str:
    """Names a student by everything that shapes it: the source weights, the head it is trained
    through and the thresholds it focuses on, the transfer texts (and those its own head is fit on)
    and the recipe."""
    h = _student_hash(src, transfer, head, {"v": FORMAT_VERSION, "p": fraction, "steps": steps, "q": quantize,
                                            "len": max_length, "th": thresholds})
    if head_texts is not None:
        h.update(b"\0head texts\n")
        for t in head_texts:
            h.update(t.encode() + b"\n")
    return h.hexdigest()[:16]


def trained_student_digest(src: Path, *, transfer: list[str], fraction: float, steps: int, max_length: int,
                           head: tuple[torch.Tensor, torch.Tensor] | None, thresholds: list[float] | None,
                           bf16: bool, device: str = "cpu") -> str:
    """Names a distilled fp32 student by what its training saw and where it ran (a GPU's numerics
    are not a CPU's), and nothing of how it is exported or quantized (nor the artifact format):
    another quantization of it reuses the training."""
    fields = {"trained": 1, "p": fraction, "steps": steps, "len": max_length, "th": thresholds, "bf16": bf16}
    if device != "cpu":  # students trained on the CPU keep the names they had before GPUs trained any
        fields["device"] = device
    return _student_hash(src, transfer, head, fields).hexdigest()[:16]


TRAINED_REPORT = "distill-report.json"


def _trained_student(*, cache: Path | None, digest: str, train, log=None) -> tuple[torch.nn.Module, DistillReport]:
    """The distilled student kept under `cache`/`digest` (a Hugging Face model directory and its
    training report), or `train()`'s (student, DistillReport), kept there when `cache` is given."""
    from transformers import AutoModel

    from .distill import DistillReport
    kept = cache / digest if cache is not None else None
    if kept is not None and (kept / TRAINED_REPORT).exists():
        student = AutoModel.from_pretrained(str(kept), attn_implementation="eager", dtype=torch.float32).eval()
        if log is not None:
            log(f"distilled student reused from {kept}")
        return student, DistillReport(**json.loads((kept / TRAINED_REPORT).read_text()))
    student, report = train()
    if kept is not None:
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache))
        student.save_pretrained(str(staging))
        fields = {k: getattr(report, k) for k in ("texts", "steps", "seconds", "losses", "teacher_layers",
                                                  "student_layers")}
        (staging / TRAINED_REPORT).write_text(json.dumps(fields))
        shutil.rmtree(kept, ignore_errors=True)
        staging.rename(kept)
    return student, report


def build_student(src: Path, out: Path, *, transfer: list[str], fraction: float, steps: int,
                  head: tuple[torch.Tensor, torch.Tensor] | None, thresholds: list[float] | None = None,
                  labels: list[str] | None = None, quantize: str | None = "int8", max_length: int = 128,
                  bf16: bool = False, head_texts: list[str] | None = None, head_fit_on: str = "other texts",
                  trained_cache: Path | None = None, device: str = "cpu", log=None) -> dict:
    """Distill a student with `fraction` of the encoder's layers removed on the `transfer` texts
    (kernels/distill.py; `thresholds`, per head row, focus it on texts near a decision), then write
    it as an ONNX artifact at `out`. With the head and thresholds, the student gets a head of its
    own (`refit_head`), fit on `head_texts` (best: text it did not train on, named in the manifest
    by `head_fit_on`; default: the transfer texts) and kept in the artifact where it agrees better
    with the teacher on others of them than the teacher's head does; engines use it in place of the
    registered head it names. `trained_cache`: where distilled students are kept by what trained
    them (`trained_student_digest`), so another quantization or artifact format of the same student
    skips the distillation. `device`: where the distillation and the head refit's forwards run
    ("cuda": a GPU; the export and quantization stay on the CPU). Returns its manifest."""
    from transformers import AutoModel, AutoTokenizer

    from .distill import StudentShape, distill_student, make_student, on_device, refit_head
    teacher = AutoModel.from_pretrained(str(src), attn_implementation="eager", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    shape = StudentShape.for_fraction(fraction, teacher.config.num_hidden_layers)

    def train():
        student = make_student(teacher, shape)
        return student, distill_student(teacher, student, tok, transfer, steps=steps, max_length=max_length,
                                        head=head, thresholds=thresholds, keep_layers=shape.keep_layers, bf16=bf16,
                                        device=device, log=log)
    trained = trained_student_digest(src, transfer=transfer, fraction=fraction, steps=steps, max_length=max_length,
                                     head=head, thresholds=thresholds, bf16=bf16, device=device)
    student, report = _trained_student(cache=trained_cache, digest=trained, train=train, log=log)
    kept = f"{len(shape.keep_layers)}of{shape.teacher_layers}"
    refit = None
    own_texts = transfer if head_texts is None else head_texts
    if head is not None and thresholds is not None and len(own_texts) >= 10:
        with on_device(device, teacher, student):  # their forwards over the head's texts run there too
            refit = refit_head(teacher, student, tok, own_texts, max_length=max_length, head=head,
                               thresholds=thresholds,
                               teacher_pooled=report.teacher_pooled if head_texts is None else None)
        if log is not None:
            log(f"student head refit: flags on {refit.check_texts} texts it was not fit on "
                f"{refit.flags_teacher_head:.3%} through the full model's head, {refit.flags_refit:.3%} through "
                f"its own; {'kept' if refit.kept else 'not kept'}")
    write_onnx_artifact(student, src, out, zero_shot=True, quantize=quantize, manifest={
        "variant": f"ort-{quantize or 'fp32'}-student{kept}", "prune": fraction, "max_length": max_length,
        "digest": student_digest(src, transfer=transfer, fraction=fraction, steps=steps, quantize=quantize,
                                 max_length=max_length, head=head, thresholds=thresholds, head_texts=head_texts),
        "student": {"keep_layers": list(shape.keep_layers), "teacher_layers": shape.teacher_layers,
                    "transfer_texts": report.texts, "steps": report.steps, "train_s": report.seconds,
                    "train_device": device, "losses": report.losses, "trained": trained}})
    if refit is None:
        return onnx_engine.read_manifest(out)
    return own_artifact_head(out, refit, head, labels, fit_on="transfer texts" if head_texts is None else head_fit_on)


def own_artifact_head(out: Path, refit, head: tuple[torch.Tensor, torch.Tensor], labels: list[str] | None, *,
                      fit_on: str = "transfer texts") -> dict:
    """Record a student's head refit (kernels/distill.HeadRefit) in the artifact at `out`, with the
    head file where it was kept, naming the registered `head` it replaces and what it was `fit_on`.
    Returns the manifest."""
    manifest = onnx_engine.read_manifest(out)
    manifest["head"] = {"file": STUDENT_HEAD_FILE if refit.kept else None, "replaces": head_digest(head[0]),
                        "fit_on": fit_on, **refit.summary()}
    if refit.kept:
        from .heads import save_head
        save_head(out / STUDENT_HEAD_FILE, refit.weight, refit.bias,
                  labels or [f"row{i}" for i in range(len(refit.bias))], {"replaces": manifest["head"]["replaces"]})
    (out / onnx_engine.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def write_cascade(out: Path, *, student_dir: str, teacher_model: str, source: Path, band: float,
                  thresholds: dict[str, list[float]], report: dict, digest: str,
                  middle: dict[str, Any] | None = None, judged_on: str | None = None) -> dict:
    """A cascade artifact at `out`: the student artifact in `out/student_dir`, the full model by
    its registered name (and its weights' path, where the name is not registered) and the CPU
    precision it runs in, the band; and a middle stage where given ({"dir": an artifact directory
    inside `out`, "band": its own band}), which scores the student's escalated inputs and passes on
    those near a threshold to the full model."""
    from .cascade import FULL_MODEL_PRECISION, MANIFEST_KIND
    manifest = {"format": FORMAT_VERSION, "kind": MANIFEST_KIND, "student": student_dir,
                "teacher_model": teacher_model, "source": str(source), "source_revision": weights_revision(source),
                "full_model_precision": FULL_MODEL_PRECISION,
                "band": band, "thresholds": thresholds, "digest": digest, "variant": "cascade", "report": report}
    if middle is not None:
        manifest["middle"] = middle
    if judged_on is not None:
        manifest["judged_on"] = judged_on
    (out / onnx_engine.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


NEAR_TIE = 0.05  # a top-label change where the reference's two highest scores are this close


def agreement(ref: list[dict[str, float]], new: list[dict[str, float]], thresholds: dict[str, float]) -> dict:
    """How far `new` scores stray from the reference, as a moderation team reads them: per-label
    flag agreement at the thresholds (`flags`, every label of every text), the share of texts whose
    flags are all identical (`texts_identical`: the share of decisions that would not change), the
    largest and the mean absolute score change; and, as a secondary figure, top-label agreement with
    the count of top-label changes that were near-ties (the reference's two highest scores within
    NEAR_TIE: parent and child labels such as violence and violence/graphic, or a benign text's low
    scores, where the top label is noise)."""
    if len(ref) != len(new) or not ref:
        raise ValueError(f"agreement: {len(ref)} reference rows, {len(new)} new rows")
    changed = [sorted(a.values(), reverse=True) for a, b in zip(ref, new) if max(a, key=a.get) != max(b, key=b.get)]
    same = [[(a[k] >= thresholds[k]) == (b[k] >= thresholds[k]) for k in a] for a, b in zip(ref, new)]
    deltas = [abs(a[k] - b[k]) for a, b in zip(ref, new) for k in a]
    n_flags = sum(len(row) for row in same)
    return {"flags": round(sum(map(sum, same)) / n_flags, 5),
            "texts_identical": round(sum(all(row) for row in same) / len(same), 5),
            "max_score_delta": round(max(deltas), 4), "mean_score_delta": round(sum(deltas) / len(deltas), 5),
            "top_label": round(1 - len(changed) / len(ref), 4), "top_label_changes": len(changed),
            "near_ties": sum(len(s) > 1 and s[0] - s[1] < NEAR_TIE for s in changed)}


def throughput(engine, texts: list[str], batch: int = 64, repeats: int = 2) -> tuple[float, list[dict[str, float]]]:
    """(items/s at `batch`, best of `repeats`; scores in input order), one batch after another, the
    texts sorted by characters. (A worker's micro-batcher sorts by token count, which pads less: on
    the built-in held-out set fp32 ran ~25% faster that way. workers/host.py `served_throughput`
    times an engine as a worker runs it.)"""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ids = engine.encode([texts[i] for i in order])
    engine.run(ids[:batch])
    best, scores = 0.0, []
    for _ in range(repeats):
        t = time.perf_counter()
        rows = [r for s in range(0, len(ids), batch) for r in engine.run(ids[s: s + batch])]
        best = max(best, len(ids) / (time.perf_counter() - t))
        scores = rows
    return best, input_order(scores, order)


def input_order(rows: list, order: list[int]) -> list:
    """`rows`, computed for the inputs in `order` (indexes into the inputs), back in input order."""
    back: list = [None] * len(order)
    for pos, i in enumerate(order):
        back[i] = rows[pos]
    return back
