"""The distilled student's recipe, one change at a time: its agreement with the fp32 model as it trains.

    python -m benchmarks.student_ablation [--prune 0.5] [--steps 2000] [--stop N] [--eval-every 500]
        [--boundary W] [--boundary-tau T] [--tail-weight W] [--tail-margin M] [--layer-weight W] [--logit-weight W]
        [--attention-weight W] [--lr LR]
        [--sample-lines 20000] [--transfer-lines 60000] [--threads N] [--neurons F [--heads H]] [--substituted F]
        [--head-texts draw|draw-alone|transfer] [--save FILE | --load FILE] [--traffic-share F [--traffic-weight W]]
        [--device auto|cpu|cuda]

The student of `gristmill optimize --distill builtin` and of `benchmarks.engine_variants` (the real
all-MiniLM-L6-v2 weights and the default moderation head), trained by kernels/distill.py with the
given loss weights (`DistillLoss`) and learning rate on the built-in transfer set plus, with
--sample-lines, lines sampled from the built-in chat model (cached). Every --eval-every steps the fp32
student is judged against the fp32 model on two held-out sets: the benchmark table's (kernels/corpus.py's
held-out sentences and the seed set) and the sample's held-out lines. Figures: per-label flag
agreement at the policy's thresholds, texts whose flags are all identical, the mean cosine of the
pooled embeddings, and the student's median logit error where the full model's logit lies within
NEAR_LOGITS of a threshold (what a cascade's band must cover). `--neurons F` trains a student of
another shape: every layer kept, F of each layer's FFN neurons (and --heads of its heads) removed by
importance on calibration text (kernels/prune.py). `--stop N` ends training after step N of a schedule of --steps (to compare
recipes early, on the same schedule); at the end of a full schedule the student is also exported as the
ONNX int8 artifact workers serve and judged by the benchmark's code, through the full model's
head and through a head of the student's own (kernels/distill.py refit_head; fit on a second draw of
the built-in transfer set and any --traffic-share texts, or with --head-texts transfer on its own
transfer texts). `--load FILE` judges a student an earlier `--save FILE` kept, in place of training
one. `--device cuda` (the default where CUDA has a GPU) trains it there, bf16 autocast; its fp32
judgements run there too, the ONNX artifact's on the CPU. `--traffic-share F` plays a user who distils on a sample of their own traffic (`gristmill
optimize --distill FILE --with-builtin N`): F of the table's texts, chosen by a hash of each text,
join the built-in transfer set as that command mixes them (`corpus.with_traffic`; --traffic-weight
sets the share of the built-in set's size they are repeated to weigh), and the student is judged on
the rest alone ("table" then names that rest; a student --load gives is judged on the same rest).
Each judgement also plays the fp32 student as a cascade's first stage on that set (`cascade`): the
band chosen on its even-indexed texts to the default floors, the share it escalates on the others,
and the least share any rule would escalate there (what part of a band's escalation the student's
own errors make unavoidable). Prints a table, then one JSON line: {"args": {...}, "curve": [{"step",
"<set>": {"flags", "texts_identical", "cosine", "near_logit_error", "cascade": {"band", "escalated",
"least_escalation", "flags", "texts_identical"}}}], "own_head": {...}, "int8": {...}, "int8_own_head": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .common import add_traffic_share_arg, traffic_split

# `near_logit_error`: the median |student logit - full model's logit| over the (text, label) pairs
# whose full-model logit lies within this of the label's threshold, where a cascade's band must
# cover the student's error for the decision to be kept.
NEAR_LOGITS = 0.5


def main(argv: list[str] | None = None) -> int:
    from gristmill.kernels.loading import TRAIN_DEVICES
    ap = argparse.ArgumentParser(prog="python -m benchmarks.student_ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prune", type=float, default=0.5, help="share of the layers removed (default 0.5: 3 of 6 kept)")
    ap.add_argument("--neurons", type=float, default=0.0,
                    help="keep every layer and remove this share of each layer's FFN neurons instead (--prune ignored)")
    ap.add_argument("--heads", type=float, default=None, help="with --neurons: share of each layer's heads removed "
                    "(default: half the --neurons share)")
    ap.add_argument("--steps", type=int, default=2000, help="the schedule's length in steps (default 2000)")
    ap.add_argument("--stop", type=int, default=0, help="stop after this step (default: the whole schedule)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--boundary", type=float, default=0.0, help="DistillLoss.boundary (default 0: off)")
    ap.add_argument("--boundary-tau", type=float, default=0.5)
    ap.add_argument("--tail-weight", type=float, default=0.0,
                    help="DistillLoss.tail: the logit errors near a decision beyond --tail-margin (default 0: off)")
    ap.add_argument("--tail-margin", type=float, default=0.05)
    ap.add_argument("--layer-weight", type=float, default=1.0)
    ap.add_argument("--logit-weight", type=float, default=1.0)
    ap.add_argument("--attention-weight", type=float, default=0.0,
                    help="DistillLoss.attention: KL of each kept layer's attention from its teacher layer's (default 0: off)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--sample-lines", type=int, default=20000)
    ap.add_argument("--sampler", default="SmolLM2-135M-Instruct")
    ap.add_argument("--transfer-lines", type=int, default=60000)
    ap.add_argument("--substituted", type=float, default=None,
                    help="share of the transfer set made of template sentences with words swapped for their "
                    "embedding neighbours, in place of as many word sequences (default: corpus.SUBSTITUTED_SHARE)")
    ap.add_argument("--save", type=Path, default=None, help="write the trained fp32 student's state_dict here")
    ap.add_argument("--load", type=Path, default=None,
                    help="judge a student --save wrote (of the same shape) instead of training one")
    ap.add_argument("--head-texts", choices=["draw", "draw-alone", "transfer"], default="draw",
                    help="what the student's own head is fit on: a second draw of the built-in transfer set and the "
                    "--traffic-share texts once each, as gristmill optimize does (default); that draw alone; or the "
                    "transfer texts it trained on")
    add_traffic_share_arg(ap, "the table's texts")
    ap.add_argument("--traffic-weight", type=float, default=None, metavar="W",
                    help="with --traffic-share: repeat the traffic to weigh W times the built-in set's size "
                    "(default: corpus.TRAFFIC_SHARE, as gristmill optimize --with-builtin)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--device", choices=TRAIN_DEVICES, default="auto",
                    help="where the student trains and is judged in fp32 (default auto: a GPU where CUDA has one); "
                    "its ONNX artifact is exported and judged on the CPU")
    ap.add_argument("--quantize", choices=["int8", "int8-tensor"], default="int8",
                    help="how the ONNX artifact is quantized (kernels/optimize.ONNX_QUANTIZE; default int8, per row)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.stop < 0 or args.eval_every < 1:
        ap.error("--steps and --eval-every must be at least 1, --stop at least 0")
    if args.traffic_weight is not None and (args.traffic_weight <= 0 or not args.traffic_share):
        ap.error("--traffic-weight must be above 0, and needs --traffic-share")

    import torch
    from transformers import AutoModel, AutoTokenizer

    from gristmill.kernels import corpus, heads, sampled
    if args.substituted is None:
        args.substituted = corpus.SUBSTITUTED_SHARE
    from gristmill.kernels.cascade import judge_on_halves
    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.kernels.distill import (DistillLoss, StudentShape, distill_student, make_student, on_device,
                                          refit_head, teacher_targets, threshold_logits)
    from gristmill.kernels.loading import training_bf16, training_device
    from gristmill.kernels.onnx_engine import OnnxClassifierEngine
    from gristmill.kernels.optimize import agreement, own_artifact_head, throughput, write_onnx_artifact
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.workers.loading import classifier_kwargs
    from gristmill.workers.optimize import (CASCADE_FLAGS, CASCADE_TEXTS, decision_thresholds, heldout_texts,
                                            sampled_lines)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = training_device(args.device)
    except RuntimeError as e:
        ap.error(f"--device {args.device}: {e}")
    spec = DEFAULT_CLASSIFIER
    src = spec.resolve_path()
    kw = classifier_kwargs(spec)
    w, b, labels, _ = heads.load_head(kw["head"])
    thresholds = decision_thresholds(spec, labels)
    z_threshold = threshold_logits([thresholds[k] for k in labels])
    teacher = AutoModel.from_pretrained(str(src), attn_implementation="eager", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    shape = StudentShape.for_fraction(0.0 if args.neurons else args.prune, teacher.config.num_hidden_layers)
    student = make_student(teacher, shape)
    sample = sampled_lines(args.sample_lines, args.sampler)
    transfer = corpus.builtin_transfer_set(args.transfer_lines, src, sampled=sampled.transfer_texts(sample),
                                           substituted=args.substituted)
    if args.neurons:
        from gristmill.kernels.prune import calibration_batches, prune
        batches = calibration_batches(tok, corpus.transfer_set(512, seed=1), spec.max_input_tokens, batch=64)
        print(prune(student, batches, args.neurons, args.heads), file=sys.stderr)
    traffic, judged = traffic_split(heldout_texts(None), args.traffic_share)
    if traffic:
        mixed = corpus.with_traffic(transfer, traffic, corpus.TRAFFIC_SHARE if args.traffic_weight is None
                                    else args.traffic_weight)
        print(f"{len(traffic)} of the table's texts join the transfer set ({(len(mixed) - len(transfer)) // len(traffic)}x); "
              f"judged on the other {len(judged)}", file=sys.stderr)
        transfer = mixed
    held = {"table": judged}
    if sample:
        held["sampled"] = sampled.heldout_texts(sample)
    length = spec.max_input_tokens
    reference = {name: teacher_targets(teacher, tok, texts, length) for name, texts in held.items()}
    curve: list[dict] = []

    def judge(step: int | str, head: tuple = (w, b)) -> None:
        student.eval()
        row: dict = {"step": step}
        for name, texts in held.items():
            e = teacher_targets(student, tok, texts, length)
            z_student, z_full = e @ head[0].T + head[1], reference[name] @ w.T + b
            same = (z_student >= z_threshold) == (z_full >= z_threshold)
            near = (z_full - z_threshold).abs() < NEAR_LOGITS
            row[name] = {"flags": round(same.float().mean().item(), 5),
                         "texts_identical": round(same.all(1).float().mean().item(), 5),
                         "cosine": round((e * reference[name]).sum(-1).mean().item(), 4),
                         "near_logit_error": round((z_student - z_full).abs()[near].median().item(), 4)
                         if near.any() else None,
                         "cascade": cascade_figures(z_student, z_full)}
        student.train()
        curve.append(row)
        print(f"step {step}: " + "; ".join(f"{k} {v['flags']:.3%} / {v['texts_identical']:.2%} (cos {v['cosine']:.3f})"
                                          for k, v in row.items() if k != "step"), file=sys.stderr, flush=True)

    def cascade_figures(z_student: torch.Tensor, z_full: torch.Tensor) -> dict:
        """The fp32 student as a cascade's first stage on these texts: the band chosen on the pick
        half to the default floors, what it escalates on the check half, and the least share any
        rule would escalate there (kernels/cascade `judge_on_halves`)."""
        def rows(z: torch.Tensor) -> list[dict[str, float]]:
            return [dict(zip(labels, r)) for r in torch.sigmoid(z.double()).tolist()]
        j = judge_on_halves(rows(z_student), rows(z_full), thresholds, flags_floor=CASCADE_FLAGS,
                            texts_floor=CASCADE_TEXTS)
        return {"band": j.band, "escalated": j.escalated, "least_escalation": j.least_escalation,
                "flags": j.agreement["flags"], "texts_identical": j.agreement["texts_identical"]}

    def on_step(step: int) -> bool:
        if step % args.eval_every == 0 or step == args.steps or step == args.stop:
            judge(step)
        return bool(args.stop) and step >= args.stop

    t0 = time.perf_counter()
    focus = [thresholds[k] for k in labels]
    loss = DistillLoss(logit=args.logit_weight, layer=args.layer_weight, boundary=args.boundary,
                       boundary_tau=args.boundary_tau, attention=args.attention_weight, tail=args.tail_weight,
                       tail_margin=args.tail_margin)
    teacher_pooled = None  # of the transfer texts, from training
    if args.load is not None:  # a student trained before (--save): judged as at the end of its schedule
        student.load_state_dict(torch.load(args.load))
    judge(0)
    steps_run = args.steps
    if args.load is None:
        report = distill_student(teacher, student, tok, transfer, steps=args.steps, max_length=length, head=(w, b),
                                 thresholds=focus, lr=args.lr, bf16=training_bf16(device), keep_layers=shape.keep_layers,
                                 loss_weights=loss, device=device, on_step=on_step,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
        steps_run, teacher_pooled = report.steps, report.teacher_pooled
    out: dict = {"args": vars(args), "transfer_texts": len(transfer), "steps_run": steps_run,
                 "train_s": round(time.perf_counter() - t0, 1), "curve": curve}
    if args.save is not None:
        torch.save(student.state_dict(), args.save)
    if steps_run == args.steps:  # the whole schedule: the artifact workers would serve, judged as the benchmark does
        draw = args.head_texts != "transfer"
        fit_texts = (corpus.builtin_head_texts(src, traffic=traffic if args.head_texts == "draw" else None) if draw
                     else transfer)
        with on_device(device, teacher, student):
            refit = refit_head(teacher, student, tok, fit_texts,
                               max_length=length, head=(w, b), thresholds=focus,
                               teacher_pooled=None if draw else teacher_pooled)
        out["own_head"] = refit.summary()
        judge("own head", (refit.weight, refit.bias))
        ref = ClassifierEngine(src, cpu_precision="fp32", **kw)
        with tempfile.TemporaryDirectory(prefix="gristmill-ablation-") as tmp:
            write_onnx_artifact(student, src, Path(tmp) / "student", zero_shot=True, quantize=args.quantize,
                                manifest={"variant": "ablation", "digest": "ablation"})
            ref_scores = {name: throughput(ref, texts, repeats=1)[1] for name, texts in held.items()}
            engine = OnnxClassifierEngine(Path(tmp) / "student", **kw)
            out["int8"] = {name: agreement(ref_scores[name], throughput(engine, texts, repeats=1)[1], thresholds)
                           for name, texts in held.items()}
            # the same artifact with the student's own head, as build_student writes it where it is kept
            own_artifact_head(Path(tmp) / "student", refit, (w, b), labels,
                              fit_on="other texts" if draw else "transfer texts")
            engine = OnnxClassifierEngine(Path(tmp) / "student", **kw)
            out["int8_own_head"] = {name: agreement(ref_scores[name], throughput(engine, texts, repeats=1)[1],
                                                    thresholds) for name, texts in held.items()}
    kept = (f"every layer, {args.neurons:.0%} of FFN neurons removed" if args.neurons
            else f"{len(shape.keep_layers)} of {shape.teacher_layers} layers")
    print(f"\nstudent {kept}, {len(transfer):,} transfer texts, "
          f"loss {loss}, lr {args.lr}")
    print("| step | " + " | ".join(f"{k}: flags / texts identical / cosine / logit error near a threshold / "
                                   f"cascade: band, escalated (least)" for k in held) + " |")
    print("| --- |" + " --- |" * len(held))

    def near_error(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"
    for row in curve:
        print(f"| {row['step']} | " + " | ".join(f"{row[k]['flags']:.3%} / {row[k]['texts_identical']:.2%} / "
                                               f"{row[k]['cosine']:.3f} / {near_error(row[k]['near_logit_error'])} / "
                                               f"{row[k]['cascade']['band']:.2f}, {row[k]['cascade']['escalated']:.1%} "
                                               f"({row[k]['cascade']['least_escalation']:.1%})"
                                               for k in held) + " |")
    for key, what in (("int8", "the full model's head"), ("int8_own_head", "its own head")):
        for name, a in out.get(key, {}).items():
            print(f"ONNX {args.quantize} artifact with {what}, {name}: flags {a['flags']:.3%}, "
                  f"texts identical {a['texts_identical']:.2%}")
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
