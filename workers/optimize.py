"""`gristmill optimize MODEL [--quantize int8|int8-tensor|int8-block|int8-rows|none] [--prune F] [--distill FILE|builtin]
[--cascade [--middle MODE]] [--out DIR]`.

Builds an ONNX Runtime artifact of a registered classifier (or, for int8-rows, a recipe for the
compiled torch engine over the same weights), then judges it against the fp32 eager
reference on held-out text as a moderation team would: per-label flag agreement at the model's
thresholds, the share of texts whose flags are all identical, score deltas, and (secondary)
top-label agreement. Under the floor nothing is written unless --force. An artifact whose digest
matches is reused, not rebuilt. Register the directory as a model's `path` and workers load it.

Without --distill, --prune removes FFN neurons and heads by importance on the calibration text.
With --distill, --prune removes that fraction of the encoder's layers and the smaller student is
trained against the full model on the transfer text (a file of your own traffic, or `builtin`,
kernels/corpus.py, or the two mixed: --distill FILE --with-builtin N). --cascade then also writes a
cascade: the student (or, with --quantize int8-rows and no --distill, int8-rows) for every input,
the full model for inputs near a threshold, with the band chosen on held-out text to meet the
cascade floors; --middle MODE puts the full model quantized so between the student and fp32, with a
band of its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A plain artifact's floor, and a cascade's: per-label flag agreement, texts whose flags all agree.
MIN_FLAGS = 0.995
CASCADE_FLAGS, CASCADE_TEXTS = 0.9995, 0.995
BUILTIN_TRANSFER_LINES = 30_000
BUILTIN_HELDOUT_LINES = 2_048


def read_texts(path: Path) -> list[str]:
    """Plain lines, or batch-input JSONL lines whose body.input (string or list) is taken."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    out: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            body = obj.get("body")
            value = body.get("input") if isinstance(body, dict) else None
            if value is None:
                raise SystemExit(f"{path}:{n}: a JSON line needs body.input (or write plain text lines)")
            out += [value] if isinstance(value, str) else list(value)
        else:
            out.append(line)
    if not out:
        raise SystemExit(f"{path}: no texts")
    return out


def heldout_texts(path: Path | None) -> list[str]:
    """The user's held-out texts, else built-in held-out text plus the labelled seed set's texts
    (the densest in moderation decisions)."""
    if path is not None:
        return read_texts(path)
    from ..kernels import corpus, heads
    return corpus.heldout_set(BUILTIN_HELDOUT_LINES) + [e.text for e in heads.load_seed()]


def decision_thresholds(spec, labels: list[str]) -> dict[str, float]:
    """The thresholds that turn this model's scores into flags: the configured moderation policy's
    where it governs this model (its label names unchanged), else the model's registered ones."""
    from ..producers.settings import Settings
    pol = Settings().policy()
    if pol is not None and pol.model == spec.name and not pol.label_map:
        return {k: pol.threshold(k) for k in labels}
    return {k: spec.threshold(k) for k in labels}


@dataclass
class Reference:
    """The fp32 eager model and its scores of the held-out texts, and the engine a worker on this
    host serves when no artifact beats it (bf16 where the CPU has native bf16): the yardstick of
    every artifact's agreement (`scores`) and speed (`timed_with`)."""
    engine: Any
    scores: list[dict[str, float]]
    default_engine: Any

    def timed_with(self, engine, texts: list[str]) -> "Speeds":
        """`engine`'s speed, fp32's and the default engine's, each as a worker serves it, the three
        timed in turns (workers/host.py `timed_in_turns`). Timed one after another, a slow moment
        on a shared machine fell on whichever was timed then, and the stored speeds that a worker
        chooses its engine by favoured the artifact or the default by chance."""
        from .host import timed_in_turns
        engines = {"fp32": self.engine, "artifact": engine}
        if self.default_engine is not self.engine:
            engines["default"] = self.default_engine
        best = timed_in_turns(engines, texts)[0]
        return Speeds(best["artifact"], best["fp32"], best.get("default", best["fp32"]), self.default_engine.variant)


@dataclass(frozen=True)
class Speeds:
    """Items/s of an engine, fp32 and the host's default engine, timed together on the same texts."""
    items_per_s: float
    fp32_items_per_s: float
    default_items_per_s: float
    default_variant: str

    def report(self) -> dict:
        return {"items_per_s": round(self.items_per_s, 1), "fp32_items_per_s": round(self.fp32_items_per_s, 1),
                "speedup": round(self.items_per_s / self.fp32_items_per_s, 2),
                "default": {"variant": self.default_variant,
                            "speedup": round(self.default_items_per_s / self.fp32_items_per_s, 2)}}


def reference_scores(spec, src: Path, heldout: list[str]) -> Reference:
    from ..kernels.classify import ClassifierEngine
    from ..kernels.optimize import throughput
    from ..producers.settings import Settings
    from .loading import classifier_kwargs
    ref = ClassifierEngine(src, cpu_precision="fp32", **classifier_kwargs(spec))
    scores = throughput(ref, heldout, repeats=1)[1]
    default = ClassifierEngine(src, cpu_precision=Settings().cpu_precision, **classifier_kwargs(spec))
    return Reference(ref, scores, ref if default.variant == ref.variant else default)


def judge(spec, src: Path, artifact: Path, heldout: list[str], reference: Reference | None = None) -> dict:
    from ..kernels.optimize import agreement, artifact_engine, throughput
    from .loading import classifier_kwargs
    ref = reference or reference_scores(spec, src, heldout)
    new = artifact_engine(artifact, **classifier_kwargs(spec))
    new_scores = throughput(new, heldout, repeats=1)[1]
    size_ref = sum(f.stat().st_size for f in Path(src).glob("*.safetensors")) or None
    onnx_file = artifact / "model.onnx"
    return {"heldout_texts": len(heldout), **ref.timed_with(new, heldout).report(),
            "size_bytes": onnx_file.stat().st_size if onnx_file.is_file() else None, "fp32_size_bytes": size_ref,
            "agreement": agreement(ref.scores, new_scores, decision_thresholds(spec, ref.engine.labels)),
            "scores": new_scores, "engine": new}


def _report_to_store(report: dict) -> dict:
    """A judge's report as it is stored and printed: without the scores and the engine it judged."""
    return {k: v for k, v in report.items() if k not in ("scores", "engine")}


def _describe(name: str, report: dict) -> str:
    a = report["agreement"]
    d = report.get("default") or {}
    vs_default = f", {d['variant']} {d['speedup']}x" if d.get("speedup", 1.0) != 1.0 else ""
    return (f"{name}: {report['speedup']}x fp32 eager ({report['items_per_s']:.0f} vs {report['fp32_items_per_s']:.0f} "
            f"items/s{vs_default}); on {report['heldout_texts']} held-out texts: flags {a['flags']:.3%}, texts identical "
            f"{a['texts_identical']:.2%}, score delta mean {a['mean_score_delta']:.4f} max {a['max_score_delta']:.3f}; "
            f"top label {a['top_label']:.1%} ({a['top_label_changes']} changes, {a['near_ties']} near-ties)")


def _resolve(model: str):
    spec = _lookup(model)
    if spec.is_generator:
        raise SystemExit(f"{spec.name} is a generator; optimize handles classifiers")
    return spec


def _lookup(model: str):
    from ..producers.errors import GristmillError
    from ..producers.settings import Settings
    try:
        specs = Settings().registry.specs
    except GristmillError as e:
        raise SystemExit(str(e))
    spec = specs.get(model) or next((s for s in specs.values() if model in s.aliases), None)
    if spec is None:
        raise SystemExit(f"no model {model!r}; registered: {', '.join(specs)}")
    return spec


# kernels/optimize.py ONNX_QUANTIZE's modes, the torch recipe and fp32: spelt here so that --help
# does not import torch (tests/unit/test_optimize.py keeps the two the same)
QUANTIZE_CHOICES = ("int8", "int8-tensor", "int8-block", "int8-rows", "none")


def main(argv: list[str]) -> int:
    from ..kernels.loading import TRAIN_DEVICES
    from ..producers.registry import DEFAULT_GENERATOR
    ap = argparse.ArgumentParser(prog="gristmill optimize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a registered classifier (name or alias)")
    ap.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8",
                    help="int8: ONNX Runtime int8 with a range per activation row (a text's scores do not depend "
                         "on its batch); int8-tensor: ONNX Runtime's dynamic int8, one range per activation "
                         "tensor (fastest, least faithful, scores depend on the batch); int8-block: 8-bit weights and "
                         "activations per block of 128 (closer to fp32, slower); int8-rows: the torch engine, "
                         "compiled, int8 with a range per activation row and q/k/v in bf16 (close to fp32 and "
                         "fast; needs a C++ compiler); none: fp32")
    ap.add_argument("--prune", type=float, default=0.0,
                    help="without --distill: fraction of FFN neurons to remove (half as many heads); with --distill: "
                         "fraction of the encoder's layers to remove")
    ap.add_argument("--distill", metavar="FILE|builtin",
                    help="train a smaller student on these unlabelled texts (your input JSONL, plain lines, or "
                         "'builtin': kernels/corpus.py's transfer set)")
    ap.add_argument("--sample-lines", type=int, default=0, metavar="N",
                    help="with --distill builtin: also sample N messages from a chat model (--sampler) on prompts "
                         "over the moderation categories and everyday topics, cached, as up to half the transfer set "
                         "(default 0; ~6.4 lines/s on 2 CPU cores)")
    ap.add_argument("--transfer-lines", type=int, default=BUILTIN_TRANSFER_LINES, metavar="N",
                    help=f"with --distill builtin: the transfer set's size, sampled texts included "
                         f"(default {BUILTIN_TRANSFER_LINES:,})")
    ap.add_argument("--with-builtin", type=int, default=0, metavar="N",
                    help="with --distill FILE: also N texts of the built-in transfer set, the file's lines repeated "
                         "to weigh about 15%% of them (a few thousand lines of your traffic then steer a student that "
                         "also learns from the built-in text; its own head is fit on a second built-in draw and the "
                         "file's lines); default 0: the file alone")
    ap.add_argument("--sampler", default=DEFAULT_GENERATOR.name,
                    help="the registered chat model --sample-lines samples from (default: the built-in generator)")
    ap.add_argument("--steps", type=int, default=2000, help="distillation steps of 64 texts (default 2000)")
    ap.add_argument("--train-device", choices=TRAIN_DEVICES, default="auto",
                    help="where --distill trains the student (default auto: a GPU where CUDA has one, else the "
                         "CPU); the artifact is exported, judged and served on the CPU either way")
    ap.add_argument("--cascade", action="store_true", help="also write a cascade: the student (or int8-rows) in front of the full model")
    ap.add_argument("--middle", choices=[q for q in QUANTIZE_CHOICES if q != "none"],
                    help="with --distill and --cascade: a middle stage between the student and the full model, the "
                         "full model quantized so (as for --quantize), with a band of its own: the student's escalated "
                         "inputs go to it, and only those near a threshold there on to the full model in fp32")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="without --distill: train the neuron-pruned model this many steps on the calibration text")
    ap.add_argument("--calibration", type=Path, help="texts for pruning importance (default: built-in sentences)")
    ap.add_argument("--texts", type=Path, help="held-out texts for the agreement check (default: built-in)")
    ap.add_argument("--out", type=Path, help="default: $GRISTMILL_HOME/models/optimized/<model>/<kind>, where "
                                             "workers on a CPU find it and serve it when it meets their floors")
    ap.add_argument("--min-flags", type=float, default=MIN_FLAGS,
                    help=f"per-label flag agreement floor of the artifact (default {MIN_FLAGS})")
    ap.add_argument("--cascade-flags", type=float, default=CASCADE_FLAGS,
                    help=f"the cascade's flag agreement floor (default {CASCADE_FLAGS})")
    ap.add_argument("--cascade-texts", type=float, default=CASCADE_TEXTS,
                    help=f"the cascade's floor on texts whose flags all agree (default {CASCADE_TEXTS})")
    ap.add_argument("--force", action="store_true", help="write the artifact even under the floor")
    args = ap.parse_args(argv)

    from ..producers.registry import POOLED_KINDS
    spec = _resolve(args.model)
    if not 0 <= args.prune < 1:
        raise SystemExit(f"--prune must be in [0, 1), got {args.prune}")
    if args.cascade and not args.distill and args.quantize != "int8-rows":
        raise SystemExit("--cascade needs a first stage: a student (--distill FILE or builtin, and --prune F) "
                         "or --quantize int8-rows")
    if args.middle and not (args.distill and args.cascade):
        raise SystemExit("--middle stands between a student and the full model: use it with --distill and --cascade")
    if args.sample_lines < 0:
        raise SystemExit(f"--sample-lines must be 0 or more, got {args.sample_lines}")
    if args.transfer_lines < 1:
        raise SystemExit(f"--transfer-lines must be 1 or more, got {args.transfer_lines}")
    if args.transfer_lines != BUILTIN_TRANSFER_LINES and args.distill != "builtin":
        raise SystemExit("--transfer-lines sizes the built-in transfer set: use it with --distill builtin")
    if args.with_builtin < 0:
        raise SystemExit(f"--with-builtin must be 0 or more, got {args.with_builtin}")
    if args.with_builtin and (not args.distill or args.distill == "builtin"):
        raise SystemExit("--with-builtin mixes the built-in transfer set into a file's: use it with --distill FILE "
                         "(with --distill builtin, --transfer-lines sizes the set)")
    if args.train_device != "auto" and not args.distill:
        raise SystemExit("--train-device says where --distill trains a student: use it with --distill FILE or builtin")
    if args.sample_lines and args.distill != "builtin":
        raise SystemExit("--sample-lines adds to the built-in transfer set: use it with --distill builtin")
    if args.distill and spec.kind not in POOLED_KINDS:
        raise SystemExit(f"--distill trains sentence-encoder students; {spec.name} is a {spec.kind}")
    src = spec.resolve_path()
    quantize = None if args.quantize == "none" else args.quantize
    if args.out is None:
        from ..kernels.optimize import TORCH_QUANTIZE, variant_name
        from ..producers.settings import Settings
        from .variants import optimized_dir
        kind = (f"cascade-via-{args.middle}" if args.middle else "cascade" if args.distill else f"cascade-{quantize}") \
            if args.cascade else "student" if args.distill else \
            f"torch-{quantize}" if quantize in TORCH_QUANTIZE else variant_name(quantize, args.prune)
        args.out = optimized_dir(Settings(), spec.name) / kind
        args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.distill:
        return _student(args, spec, src, quantize)
    if quantize == "int8-rows":
        return _torch_recipe(args, spec, src, quantize)
    return _pruned(args, spec, src, quantize)


# The rule that chooses a cascade's bands from held-out scores: a new rule builds cascades again.
# 2: the student's and a middle stage's bands chosen together (kernels/cascade `judge_three_stages`).
CASCADE_RULE = 2


@dataclass(frozen=True)
class Judging:
    """The held-out texts a build is judged on, and a digest of everything its judgement depends on
    beyond the artifact's own inputs: those texts, the floors, and for a cascade the rule that
    chooses its bands. A build whose artifact's inputs are unchanged but whose judging is not is
    done again: a cascade's band is chosen on those texts to those floors."""
    texts: list[str]
    digest: str

    @classmethod
    def of(cls, args) -> "Judging":
        import hashlib
        texts = heldout_texts(args.texts)
        h = hashlib.sha256(json.dumps(texts).encode())
        h.update(json.dumps({"min_flags": args.min_flags, "cascade": [args.cascade_flags, args.cascade_texts, CASCADE_RULE]
                             if args.cascade else None}).encode())
        return cls(texts, h.hexdigest()[:16])


def _require_compiler(option: str) -> None:
    """Exit, saying why, where `option` (a compiled torch recipe) cannot be built on this host."""
    from ..kernels.loading import cpu_compiler
    if cpu_compiler() is None:
        raise SystemExit(f"{option} runs through torch.compile, which needs a C++ compiler on a CPU: "
                         "install g++ (Debian: build-essential) or set CXX")


def _torch_recipe(args, spec, src: Path, quantize: str) -> int:
    from ..kernels.optimize import torch_recipe_digest, write_torch_recipe
    if args.prune:
        raise SystemExit(f"--quantize {quantize} runs the full model: --prune needs --quantize int8, int8-tensor, int8-block or none")
    _require_compiler(f"--quantize {quantize}")
    digest = torch_recipe_digest(src, quantize=quantize, compile=True)
    judging = Judging.of(args)
    digest_out = digest + (f"-cascade-{judging.digest}" if args.cascade else "")
    if _up_to_date(args.out, digest_out, judging):
        return 0
    staging = _staging(args.out)
    heldout = judging.texts
    if not args.cascade:
        manifest = write_torch_recipe(src, staging, quantize=quantize, compile=True)
        return _finish(args, staging, manifest, judge(spec, src, staging, heldout), digest, judging)
    # int8-rows for every input, the full model again for those near a threshold
    manifest = write_torch_recipe(src, staging / "student", quantize=quantize, compile=True)
    reference = reference_scores(spec, src, heldout)
    return _cascade(args, spec, src, staging, manifest, judge(spec, src, staging / "student", heldout, reference),
                    reference, judging, digest_out)


def _pruned(args, spec, src: Path, quantize: str | None) -> int:
    from ..kernels import texts as builtin
    from ..kernels.optimize import artifact_digest, build_artifact
    from ..producers.registry import POOLED_KINDS
    calibration = read_texts(args.calibration) if args.calibration else builtin.sentences(256)
    judging = Judging.of(args)
    zero_shot = spec.kind in POOLED_KINDS  # the artifact is the encoder; the head or prototypes stay outside
    digest = artifact_digest(src, zero_shot=zero_shot, quantize=quantize, prune=args.prune,
                             calibration=calibration, max_length=spec.max_input_tokens,
                             distill_steps=args.distill_steps)
    if _up_to_date(args.out, digest, judging):
        return 0
    staging = _staging(args.out)
    manifest = build_artifact(src, staging, zero_shot=zero_shot, quantize=quantize, prune=args.prune,
                              calibration=calibration, max_length=spec.max_input_tokens,
                              distill_steps=args.distill_steps)
    return _finish(args, staging, manifest, judge(spec, src, staging, judging.texts), digest, judging)


def _up_to_date(out: Path, digest: str, judging: Judging) -> bool:
    """True, said with its report, where `out` already holds the artifact of these inputs, judged so."""
    from ..kernels.onnx_engine import read_manifest
    existing = read_manifest(out)
    if not (existing and existing.get("digest") == digest and existing.get("judged_on") == judging.digest
            and existing.get("report")):
        return False
    print(f"{out}: up to date (digest {digest}); reusing it")
    print(json.dumps(existing["report"]))
    return True


def _staging(out: Path) -> Path:
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _finish(args, staging: Path, manifest: dict, report: dict, digest: str, judging: Judging) -> int:
    report = _report_to_store(report)
    manifest["report"], manifest["judged_on"] = report, judging.digest
    (staging / "gristmill-artifact.json").write_text(json.dumps(manifest, indent=2))
    print(_describe(manifest["variant"], report))
    refusal = None
    if report["agreement"]["flags"] < args.min_flags and not args.force:
        refusal = (f"flag agreement {report['agreement']['flags']:.3%} is under the floor {args.min_flags:.3%}; "
                   f"nothing written. Prune less, give text like your traffic, build a --cascade, or pass --force.")
    return _install(args.out, staging, refusal, report, digest, "register it as a model path to use it")


def _install(out: Path, staging: Path, refusal: str | None, report: dict, digest: str, use: str) -> int:
    """Move the staged artifact to `out` (exit 0), or drop it and say why (`refusal`; exit 3)."""
    if refusal is not None:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"refused: {refusal}", file=sys.stderr)
        return 3
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"wrote {out} (digest {digest}); {use}")
    print(json.dumps(report))
    return 0


def _student(args, spec, src: Path, quantize: str | None) -> int:
    from ..kernels import corpus, heads
    from ..kernels.loading import training_bf16, training_device
    from ..kernels.optimize import build_student, student_digest
    from ..producers.settings import Settings
    from .loading import classifier_kwargs
    try:
        train_device = training_device(args.train_device)
    except RuntimeError as e:
        raise SystemExit(f"--train-device {args.train_device}: {e}") from None
    lines: list[str] = []  # a file's lines mixed into the built-in set
    if args.distill == "builtin":
        transfer = corpus.builtin_transfer_set(args.transfer_lines, src,
                                               sampled=sampled_transfer(args.sample_lines, args.sampler))
    else:
        transfer = read_texts(Path(args.distill))
        if args.with_builtin:
            lines = transfer
            transfer = corpus.with_traffic(corpus.builtin_transfer_set(args.with_builtin, src), lines)
    judging = Judging.of(args)
    heldout = judging.texts
    kw = classifier_kwargs(spec)
    loaded = heads.load_head(kw["head"]) if kw.get("head") is not None else None
    head = loaded[:2] if loaded is not None else None
    focus = list(decision_thresholds(spec, loaded[2]).values()) if loaded is not None else None
    # a student of the built-in set fits its own head on a second draw of it (and a file's lines
    # mixed in, once each); one of a file alone, on its lines
    builtin = args.distill == "builtin" or args.with_builtin
    head_texts = corpus.builtin_head_texts(src, traffic=lines) if builtin and head is not None else None
    digest = student_digest(src, transfer=transfer, fraction=args.prune, steps=args.steps, quantize=quantize,
                            max_length=spec.max_input_tokens, head=head, thresholds=focus, head_texts=head_texts)
    digest_out = digest + (f"-cascade-{judging.digest}" if args.cascade else "")
    if args.middle:
        digest_out += "-via-" + _full_model_digest(spec, src, args.middle)
    if _up_to_date(args.out, digest_out, judging):
        return 0
    staging = _staging(args.out)
    student_dir = staging / "student" if args.cascade else staging
    manifest = build_student(src, student_dir, transfer=transfer, fraction=args.prune, steps=args.steps, head=head,
                             thresholds=focus, labels=loaded[2] if loaded is not None else None, quantize=quantize,
                             max_length=spec.max_input_tokens, bf16=training_bf16(train_device), head_texts=head_texts,
                             head_fit_on="other texts and the file's lines" if lines else "other texts",
                             trained_cache=Settings().model_cache_dir / "students", device=train_device.type,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    reference = reference_scores(spec, src, heldout)
    report = judge(spec, src, student_dir, heldout, reference)
    if not args.cascade:
        return _finish(args, staging, manifest, report, digest, judging)
    middle = None
    if args.middle:
        built = _build_full_model(spec, src, staging / MIDDLE_DIR, args.middle)
        middle = {**judge(spec, src, staging / MIDDLE_DIR, heldout, reference), "variant": built["variant"]}
    return _cascade(args, spec, src, staging, manifest, report, reference, judging, digest_out, middle)


MIDDLE_DIR = "middle"  # a three-stage cascade's middle stage, inside its directory


def _full_model_digest(spec, src: Path, quantize: str) -> str:
    """The digest of the full model quantized so (`_build_full_model`)."""
    from ..kernels import texts as builtin
    from ..kernels.optimize import TORCH_QUANTIZE, artifact_digest, torch_recipe_digest
    from ..producers.registry import POOLED_KINDS
    if quantize in TORCH_QUANTIZE:
        return torch_recipe_digest(src, quantize=quantize, compile=True)
    return artifact_digest(src, zero_shot=spec.kind in POOLED_KINDS, quantize=quantize, prune=0.0,
                           calibration=builtin.sentences(256), max_length=spec.max_input_tokens)


def _build_full_model(spec, src: Path, out: Path, quantize: str) -> dict:
    """The whole model quantized as --quantize would build it, unpruned, at `out` (a middle stage)."""
    from ..kernels import texts as builtin
    from ..kernels.optimize import TORCH_QUANTIZE, build_artifact, write_torch_recipe
    from ..producers.registry import POOLED_KINDS
    if quantize in TORCH_QUANTIZE:
        _require_compiler(f"--middle {quantize}")
        return write_torch_recipe(src, out, quantize=quantize, compile=True)
    return build_artifact(src, out, zero_shot=spec.kind in POOLED_KINDS, quantize=quantize, prune=0.0,
                          calibration=builtin.sentences(256), max_length=spec.max_input_tokens)


def sampled_transfer(n: int, sampler: str) -> list[str]:
    """Transfer texts from `n` lines sampled from the registered chat model `sampler`, held-out
    lines left out."""
    from ..kernels import sampled
    return sampled.transfer_texts(sampled_lines(n, sampler))


def sampled_lines(n: int, sampler: str) -> list[str]:
    """`n` lines sampled from the registered chat model `sampler` (cached under the model cache; on
    CUDA where there is one)."""
    if not n:
        return []
    from ..kernels import sampled
    from ..producers.settings import Settings
    gen = _lookup(sampler)
    if not gen.is_generator:
        raise SystemExit(f"--sampler needs a chat model; {gen.name} is a {gen.kind}")
    import torch
    return sampled.sample_lines(n, generator=gen.resolve_path(), cache_dir=Settings().model_cache_dir,
                                device="cuda" if torch.cuda.is_available() else "cpu",
                                log=lambda m: print(m, file=sys.stderr, flush=True))


def _cascade(args, spec, src: Path, staging: Path, manifest: dict, report: dict, reference: Reference,
             judging: Judging, digest_out: str, middle: dict | None = None) -> int:
    """Around the first stage judged in `staging/student` (`report`, with its scores and engine):
    the band, chosen on half the held-out texts and judged on the other half, the cascade's speed
    measured end to end on that half, and the cascade's manifest. With `middle` (the judged middle
    stage in `staging/middle`), the middle stage's band and the student's are chosen together
    (kernels/cascade.py `judge_three_stages`)."""
    from ..kernels.cascade import CHECK, CascadeEngine, estimated_speedup, judge_on_halves, judge_three_stages
    from ..kernels.optimize import write_cascade
    thresholds = decision_thresholds(spec, reference.engine.labels)
    # escalate near the policy's thresholds (where the band is chosen) and the model's own: the
    # figures below are of the cascade as workers serve it
    every = {k: sorted({t, spec.threshold(k)}) for k, t in thresholds.items()}
    floors = dict(flags_floor=args.cascade_flags, texts_floor=args.cascade_texts)
    full, middle_report = reference.engine, None
    if middle is None:
        judged = judge_on_halves(report["scores"], reference.scores, thresholds, **floors, escalate_at=every)
    else:  # the two bands chosen together
        three = judge_three_stages(report["scores"], middle["scores"], reference.scores, thresholds, **floors,
                                   escalate_at=every, first_speedup=report["speedup"], middle_speedup=middle["speedup"])
        judged = three.judged
        full = CascadeEngine(middle["engine"], reference.engine, band=three.middle_band, thresholds=every)
        middle_report = {"dir": MIDDLE_DIR, "band": three.middle_band, "to_full": three.to_full,
                         "bands_tried": three.tried, "report": _report_to_store(middle)}
    band, escalated = judged.band, judged.escalated
    # what the cascade costs, estimated from its stages' speeds ...
    if middle_report is None:
        estimate = estimated_speedup(report["speedup"], escalated)
    else:
        estimate = estimated_speedup(report["speedup"], escalated, middle_speedup=middle["speedup"],
                                     to_full=middle_report["to_full"])
    # ... and measured, as a worker runs it: the micro-batcher gathers escalated inputs into the full
    # model's own batches (workers/host.py), though the last, partial one still costs a whole call;
    # fp32 and the default engine timed the same way, in turns
    cascade = CascadeEngine(report["engine"], full, band=band, thresholds=every)
    half = judging.texts[CHECK]
    cascade_report = {"band": band, "band_chosen_on": judged.chosen_on, "heldout_texts": judged.texts,
                      "escalated": escalated, **reference.timed_with(cascade, half).report(),
                      "speedup_estimate": round(estimate, 2),
                      "full_model_near": judged.full_model_near, "least_escalation": judged.least_escalation,
                      "agreement": judged.agreement,
                      "student": _report_to_store(report),
                      **({"middle": middle_report} if middle_report else {})}
    a = cascade_report["agreement"]
    print(_describe(manifest["variant"], _report_to_store(report)))
    if middle_report is not None:
        print(_describe(f"middle stage {middle_report['report'].get('variant', args.middle)}", middle_report["report"]))
    onward = (f"a middle stage ({args.middle}, its own band {middle_report['band']}), which passes on to the full model "
              f"{middle_report['to_full']:.2%} of all the texts" if middle_report else "the full model")
    print(f"cascade: band {band} (logit units) escalates {escalated:.2%} of {judged.texts} held-out texts to "
          f"{onward}; flags {a['flags']:.3%}, texts identical {a['texts_identical']:.2%}; "
          f"{cascade_report['speedup']:.2f}x fp32 measured end to end (estimate {estimate:.2f}x). "
          f"The full model's own scores put {cascade_report['full_model_near']:.2%} of these texts within that band; "
          f"to meet the floors any rule would escalate at least {judged.least_escalation:.2%}, the first stage's errors")
    write_cascade(staging, student_dir="student", teacher_model=spec.name, source=src, band=band,
                  thresholds=every, report=cascade_report, digest=digest_out, judged_on=judging.digest,
                  middle={"dir": MIDDLE_DIR, "band": middle_report["band"]} if middle_report else None)
    refusal = None
    if (a["flags"] < args.cascade_flags or a["texts_identical"] < args.cascade_texts) and not args.force:
        refusal = (f"the cascade misses its floors (flags {args.cascade_flags:.3%}, texts {args.cascade_texts:.2%}) "
                   f"on the held-out half; nothing written. Train longer, prune less, or pass --force.")
    return _install(args.out, staging, refusal, cascade_report, digest_out,
                    "register it as a model path to serve the cascade")
