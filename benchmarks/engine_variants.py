"""Engine variants of the default classifier against fp32 eager, in one run: speed and agreement.

    python -m benchmarks.engine_variants [--device cpu|cuda] [--quick] [--texts FILE] [--student-steps N]
        [--transfer-lines N] [--sample-lines N] [--traffic-share F]

CPU: the real all-MiniLM-L6-v2 weights and the default moderation head. Variants: fp32 eager (the
reference), bf16 autocast (on CPUs with native bf16), `int8_rows` (the torch engine compiled, int8
with an asymmetric range per activation row, q/k/v in bf16 where the CPU has it: kernels/quant.py),
ONNX Runtime fp32 (fused), `int8` (ONNX Runtime int8 with one activation range per token row:
kernels/onnx_rowwise.py), `int8_tensor` (ONNX Runtime's dynamic int8: one range per tensor),
`int8_block` (8-bit weights and activations per block of 128, attention int8), `int8_pruned` (a
student with half the layers removed, distilled on the built-in transfer set (kernels/corpus.py),
int8 per token row) and `cascade` (that student for every input, the full model in fp32, as
workers run it in a cascade, for inputs near a threshold; the band chosen on half the held-out
texts, everything reported on the other half; at each of a range of bands, what it escalates and
keeps, and what the fp32 model's own scores put within the band; and every variant as a cascade's
first stage, estimated, with the least share any escalation rule must send on to meet the floors)
and `cascade_int8_rows` (int8_rows as the first stage), and `cascade_three_stage` (the student,
then int8_rows with a band of its own, then fp32; the two bands chosen together). Each cascade is
timed end to end through a micro-batcher as a worker runs it (workers/host.py `served_throughput`:
batches sorted by token count, the escalated inputs of many batches gathered into the full model's
own batches), against fp32 timed the same way, and, for comparison, with each batch's escalated
inputs as their own call of the full model (`escalated_each_batch`).
Where the CPU has bf16, every variant's speed is also given against bf16 (`speedup_vs_bf16`), the
engine a worker serves without an artifact.
The student is built once and cached under
$GRISTMILL_HOME/models/optimized (~20 min on 2 cores). `--sample-lines N` adds N lines sampled from
the built-in chat model (kernels/sampled.py, cached) as up to half of its transfer set; the
student's agreement is also given by held-out source (on the built-in text, its flag errors by template
core sentence too), and on the sample's own held-out lines. `--traffic-share F` plays a user who distils
on a sample of their own traffic (`gristmill optimize --distill FILE --with-builtin N`): F of the
held-out texts, chosen by a hash of each text, join the student's transfer set as that command mixes
them, and every variant is judged on the rest alone.

Agreement with fp32 on held-out text (kernels/corpus.py's held-out set plus the seed set's texts,
unless --texts), as a moderation team reads it: per-label flag agreement at the policy's thresholds
(`flags`), the share of texts whose flags are all identical (`texts_identical`), mean and max score
delta; top-label agreement as a secondary figure. And whether a text's scores depend on its batch:
each variant scores the same texts again in a shuffled order, 64 to a batch, and its flags are
compared with its own first scores (`batch_independence`). Quality on labelled text: the seed set
in 4-fold cross-validation (each text scored by a head trained, on fp32 embeddings, without its fold), the
per-label precision, recall and F1 of each variant against fp32's.
Without --quick it also measures, on the CPU and the real weights, the agreement of the GPU variants'
numerics (int8 weight-only, W8A8, fp8, 2:4), whose speed only counts on a GPU.
CUDA: MiniLM's architecture with random weights, 128-token inputs at batch 512: torch fp32, bf16,
fp16 eager, torch.compile, int8 weight-only (Triton), W8A8 (torch._int_mm), fp8 (torch._scaled_mm),
2:4 sparsity, each timed with CUDA events over four rotating input sets; logits' relative error
against fp32 on the same inputs.
Prints a table, then one JSON line: {"variants": {"fp32": {...}, "int8": {"speedup", "agreement"}, ...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .common import add_traffic_share_arg, random_minilm_classifier, table, texts, traffic_split

STUDENT_PRUNE = 0.5  # half of MiniLM-L6's layers: 3 of 6 stay


def labelled_quality(embed_fns: dict, ref_name: str = "fp32") -> dict[str, dict]:
    """Per-label precision, recall and F1 of each variant on the seed set in 4-fold cross-validation
    (fold heads trained on fp32 embeddings), and each variant's change against `ref_name`'s."""
    import torch

    from gristmill.kernels import heads
    examples = heads.load_seed()
    labels = heads.seed_labels(examples)
    y = heads.targets_of(examples, labels)
    fold = torch.tensor(heads.folds(examples))
    embs = {name: fn([e.text for e in examples]) for name, fn in embed_fns.items()}
    fold_heads = [heads.fit(embs[ref_name][fold != f], y[fold != f]) for f in range(heads.FOLDS)]
    out: dict[str, dict] = {}
    for name, emb in embs.items():
        scores = torch.zeros_like(y)
        for f, (w, b) in enumerate(fold_heads):
            held = fold == f
            scores[held] = torch.sigmoid(emb[held] @ w.T + b)
        pred = scores >= 0.5
        per = {}
        for j, label in enumerate(labels):
            tp = int((pred[:, j] & (y[:, j] == 1)).sum())
            fp = int((pred[:, j] & (y[:, j] == 0)).sum())
            fn = int((~pred[:, j] & (y[:, j] == 1)).sum())
            p = tp / (tp + fp) if tp + fp else 0.0
            r = tp / (tp + fn) if tp + fn else 0.0
            per[label] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
        out[name] = per
    report = {}
    for name, per in out.items():
        delta = {label: {k: round(per[label][k] - out[ref_name][label][k], 4) for k in ("precision", "recall", "f1")}
                 for label in labels}
        report[name] = {"macro_f1": round(sum(v["f1"] for v in per.values()) / len(per), 4),
                        "macro_f1_change": round(sum(d["f1"] for d in delta.values()) / len(delta), 4),
                        "worst_label_f1_change": min(round(d["f1"], 4) for d in delta.values()),
                        "labels_changed": sum(any(d[k] for k in d) for d in delta.values()), "per_label_change": delta}
    return report


def cpu_variants(args, train_device) -> dict[str, dict]:
    """`train_device`: where the student trains (kernels/loading `training_device`, resolved by `main`)."""
    import torch

    from gristmill.kernels import corpus, heads, sampled as sampling
    from gristmill.kernels.cascade import CHECK, CascadeEngine, deciders, judge_on_halves, judge_three_stages, near
    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.kernels.loading import cpu_compiler, cpu_has_bf16, training_bf16
    from gristmill.kernels.onnx_engine import OnnxClassifierEngine, read_manifest
    from gristmill.kernels.optimize import (agreement, build_artifact, build_student, student_digest, throughput,
                                            torch_recipe_engine)
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.producers.settings import Settings
    from gristmill.workers.host import served_throughput
    from gristmill.workers.loading import classifier_kwargs
    from gristmill.workers.optimize import decision_thresholds, heldout_texts, sampled_lines

    spec = DEFAULT_CLASSIFIER
    src = spec.resolve_path()
    traffic, heldout = traffic_split(heldout_texts(args.texts), args.traffic_share)
    calibration = corpus.transfer_set(256, seed=1)
    kw = classifier_kwargs(spec)
    ref = ClassifierEngine(src, cpu_precision="fp32", **kw)
    thresholds = decision_thresholds(spec, ref.labels)  # the shipped policy's
    ref_ips, ref_scores = throughput(ref, heldout, repeats=args.repeats)
    out = {"fp32": {"variant": ref.variant, "items_per_s": round(ref_ips, 1), "speedup": 1.0,
                    "agreement": agreement(ref_scores, ref_scores, thresholds)}}
    engines: dict = {"fp32": ref}
    student_scores = {}

    def add(name: str, engine, extra: dict | None = None) -> None:
        ips, scores = throughput(engine, heldout, repeats=args.repeats)
        student_scores[name] = scores
        engines[name] = engine
        out[name] = {"variant": engine.variant, "items_per_s": round(ips, 1), "speedup": round(ips / ref_ips, 2),
                     "agreement": agreement(ref_scores, scores, thresholds),
                     "batch_independence": batch_independence(engine, heldout, scores, thresholds), **(extra or {})}

    if cpu_has_bf16():
        add("bf16", ClassifierEngine(src, cpu_precision="bf16", **kw))
    if cpu_compiler() is not None:  # torch.compile's CPU backend builds C++
        add("int8_rows", ClassifierEngine(src, cpu_precision="auto", **torch_recipe_engine("int8-rows"), **kw))
    work = Path(tempfile.mkdtemp(prefix="gristmill-variants-"))
    for name, quantize in [("ort_fp32", None), ("int8", "int8"), ("int8_tensor", "int8-tensor"),
                           ("int8_block", "int8-block")]:
        m = build_artifact(src, work / name, zero_shot=True, quantize=quantize, calibration=calibration,
                           max_length=spec.max_input_tokens)
        add(name, OnnxClassifierEngine(work / name, **kw), {"size_mb": round(m["size_bytes"] / 1e6, 1)})
    # the distilled student, built once per recipe and kept
    w, b, head_labels, _ = heads.load_head(kw["head"])
    head = (w, b)
    sample = sampled_lines(args.sample_lines, args.sampler)
    sampled = sampling.transfer_texts(sample)
    transfer = corpus.with_traffic(corpus.builtin_transfer_set(args.transfer_lines, src, sampled=sampled), traffic)
    focus = [thresholds[k] for k in head_labels]
    head_texts = corpus.builtin_head_texts(src, traffic=traffic)
    digest = student_digest(src, transfer=transfer, fraction=STUDENT_PRUNE, steps=args.student_steps,
                            quantize="int8", max_length=spec.max_input_tokens, head=head, thresholds=focus,
                            head_texts=head_texts)
    student_dir = Settings().model_cache_dir / "optimized" / f"bench-student-{digest}"
    manifest = read_manifest(student_dir)
    if manifest is None or manifest.get("digest") != digest:
        manifest = build_student(src, student_dir, transfer=transfer, fraction=STUDENT_PRUNE, steps=args.student_steps,
                                 head=head, thresholds=focus, labels=head_labels, quantize="int8",
                                 max_length=spec.max_input_tokens, bf16=training_bf16(train_device),
                                 head_texts=head_texts,
                                 head_fit_on="other texts and the traffic's sample" if traffic else "other texts",
                                 trained_cache=Settings().model_cache_dir / "students", device=train_device.type,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
    student = OnnxClassifierEngine(student_dir, **kw)
    add("int8_pruned", student, {"size_mb": round(manifest["size_bytes"] / 1e6, 1), "student": manifest["student"],
                                 "transfer_set": {"texts": len(transfer), "source": "kernels/corpus.py transfer_set",
                                                  "sampled_lines": args.sample_lines,
                                                  "traffic_texts": len(traffic), "judged_texts": len(heldout),
                                                  "sampled_texts": min(len(sampled), corpus.sampled_share(len(transfer)))}})
    out["int8_pruned"]["by_source"] = by_source(ref_scores, student_scores["int8_pruned"], heldout, thresholds,
                                                args.texts is None)
    if args.texts is None:
        out["int8_pruned"]["by_core"] = by_core(ref_scores, student_scores["int8_pruned"], heldout, thresholds)
    if sample:  # the sample's own held-out lines: moderation-like text nearer real messages
        held = sampling.heldout_texts(sample)
        out["int8_pruned"]["by_source"]["sampled held-out lines"] = {
            "texts": len(held), **agreement(throughput(ref, held, repeats=1)[1], throughput(student, held, repeats=1)[1],
                                            thresholds)}
    half = heldout[CHECK]  # the cascade's band is chosen on the other half
    ref_half = ref_scores[CHECK]  # fp32's scores of that half, as every variant is judged against
    # the micro-batcher sorts by token count, where `throughput` sorts by characters: the cascades
    # timed through it are compared with fp32 timed the same way
    ref_served_ips = served_throughput(ref, half, repeats=args.repeats)[0]
    bands = {}

    def add_cascade(name: str, first: str, middle: str | None = None) -> None:
        """`first` for every input, the full model (in fp32, as workers run it in a cascade) for
        those near a threshold, timed end to end on the check half with the band chosen on the pick
        half. A `middle` variant between them, with a band of its own, makes three stages, as
        `gristmill optimize --middle` builds them: the two bands chosen together."""
        full = None
        if middle is None:
            judged = judge_on_halves(student_scores[first], ref_scores, thresholds,
                                     flags_floor=args.cascade_flags, texts_floor=args.cascade_texts)
        else:
            three = judge_three_stages(student_scores[first], student_scores[middle], ref_scores, thresholds,
                                       flags_floor=args.cascade_flags, texts_floor=args.cascade_texts,
                                       first_speedup=out[first]["speedup"], middle_speedup=out[middle]["speedup"])
            judged = three.judged
            full = CascadeEngine(engines[middle], ref, band=three.middle_band, thresholds=thresholds)
        cascade = CascadeEngine(engines[first], full or ref, band=judged.band, thresholds=thresholds)
        # as a worker runs it: escalated inputs batched among themselves; and, the baseline, each
        # batch's escalated inputs as their own call of the full model
        c_ips, c_scores = served_throughput(cascade, half, repeats=args.repeats)
        per_batch_ips = served_throughput(cascade, half, repeats=args.repeats, stages=False)[0]
        bands[name] = (first, judged.band)
        if full is None:  # (three stages: no labelled-set figures, which embed through fp32)
            engines[name] = cascade
        out[name] = {"variant": cascade.variant, "items_per_s": round(c_ips, 1),
                     "speedup": round(c_ips / ref_served_ips, 2), "fp32_items_per_s": round(ref_served_ips, 1),
                     "escalated_each_batch": {"items_per_s": round(per_batch_ips, 1),
                                              "speedup": round(per_batch_ips / ref_served_ips, 2)},
                     "band": judged.band, "band_chosen_on": judged.chosen_on,
                     "escalated": judged.escalated, "least_escalation": judged.least_escalation,
                     "heldout_texts": len(half),
                     "agreement": agreement(ref_half, [{k: v for k, v in r.items() if k in thresholds}
                                                       for r in c_scores], thresholds)}
        out[name]["band_curve"] = band_curve(student_scores[first][CHECK], ref_scores[CHECK], thresholds)
        if middle is not None:  # the middle stage's band, and the share of all inputs it passed on to fp32
            out[name].update(middle_band=three.middle_band, to_full=three.to_full, bands_tried=three.tried,
                             to_full_served=round(deciders(c_scores).count("full") / len(c_scores), 4))

    add_cascade("cascade", "int8_pruned")
    if "int8_rows" in engines:
        add_cascade("cascade_int8_rows", "int8_rows")
        # the student's escalated inputs through that cascade in turn: most of them int8_rows decides
        add_cascade("cascade_three_stage", "int8_pruned", middle="int8_rows")
    for name, scores in student_scores.items():  # every variant as a cascade's first stage, the same way
        out[name]["as_cascade_front"] = as_cascade_front(scores, ref_scores, thresholds, args,
                                                         speedup=out[name]["speedup"])
    if "bf16" in out:  # bf16 is what a worker serves without an artifact: the floor to beat
        for name, v in out.items():
            # a cascade: bf16 scaled to the half, timed as the cascade was
            base = out["bf16"]["items_per_s"] * (ref_served_ips / ref_ips if name in bands else 1.0)
            v["speedup_vs_bf16"] = round(v["items_per_s"] / base, 2)
    if not args.quick:
        for name, extra in GPU_NUMERICS_ON_CPU.items():
            add(f"gpu_{name}", ClassifierEngine(src, cpu_precision="fp32", **extra, **kw), {"numerics_only": True})

    def embed_with(engine):
        return lambda xs: torch.cat([engine.embed(engine.encode(xs[i:i + 64])) for i in range(0, len(xs), 64)])

    def cascade_embed(name: str):
        first, band = bands[name]

        def embed(xs):
            s_emb, t_emb = embed_with(engines[first])(xs), embed_with(ref)(xs)
            rows = [r for i in range(0, len(xs), 64) for r in engines[first].run(engines[first].encode(xs[i:i + 64]))]
            up = torch.tensor([near(r, thresholds, band) for r in rows])
            return torch.where(up[:, None], t_emb, s_emb)
        return embed
    fns = {name: cascade_embed(name) if name in bands else embed_with(e) for name, e in engines.items()}
    for name, q in labelled_quality(fns).items():
        out[name]["labelled"] = q
    return out


def batch_independence(engine, texts: list[str], scores: list[dict], thresholds: dict[str, float],
                       batch: int = 64, seed: int = 0) -> dict:
    """The same texts scored again in a shuffled order (other neighbours in each batch, other
    padding), against `scores`: flag agreement and texts whose flags are all the same. 100% where a
    text's scores do not depend on its batch."""
    import random

    from gristmill.kernels.optimize import agreement, input_order
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    ids = engine.encode([texts[i] for i in order])
    rows = [r for s in range(0, len(ids), batch) for r in engine.run(ids[s: s + batch])]
    a = agreement(scores, input_order(rows, order), thresholds)
    return {"flags": a["flags"], "texts_identical": a["texts_identical"], "max_score_delta": a["max_score_delta"]}


def as_cascade_front(scores: list[dict], ref: list[dict], thresholds: dict[str, float], args, *,
                     speedup: float) -> dict:
    """A variant as the first stage of a cascade in front of the full model (fp32, as workers run
    it in a cascade): the band that meets the cascade's floors on one half of the held-out texts,
    and on the other half what it escalates and keeps, with its speed estimated from the two stages'
    measured speeds (every input through the variant, the escalated share again through the full
    model: kernels/cascade.py `estimated_speedup`)."""
    from gristmill.kernels.cascade import estimated_speedup, judge_on_halves
    judged = judge_on_halves(scores, ref, thresholds, flags_floor=args.cascade_flags, texts_floor=args.cascade_texts)
    return {"band": judged.band, "escalated": judged.escalated, "flags": judged.agreement["flags"],
            "texts_identical": judged.agreement["texts_identical"], "least_escalation": judged.least_escalation,
            "floors_met_where_chosen": judged.floors_met_where_chosen(args.cascade_flags, args.cascade_texts),
            "speedup_estimate": round(estimated_speedup(speedup, judged.escalated), 2)}


def band_curve(student: list[dict], full: list[dict], thresholds: dict[str, float],
               bands: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.55, 0.75, 1.0)) -> list[dict]:
    """What a cascade of `student` and `full` escalates and keeps at each band (the full model's
    scores standing in for its answers on the escalated inputs), and the share the full model's own
    scores put within the band (what even a student without error would escalate there)."""
    from gristmill.kernels.cascade import escalate, full_model_near
    from gristmill.kernels.optimize import agreement
    curve = []
    for band in bands:
        rows, up = escalate(student, full, thresholds, band)
        a = agreement(full, rows, thresholds)
        curve.append({"band": band, "escalated": round(sum(up) / len(up), 4), "flags": a["flags"],
                      "texts_identical": a["texts_identical"],
                      "full_model_near": round(full_model_near(full, thresholds, band), 4)})
    return curve


# GPU variants of the torch engine (kernels/quant.py): name -> ClassifierEngine keywords.
GPU_VARIANTS = {
    "fp32": {"dtype": "float32"},
    "bf16": {},
    "fp16": {"dtype": "float16"},
    "bf16_compiled": {"compile": True},
    "int8wo": {"quantize": "int8-weight-only"},
    "w8a8": {"quantize": "int8-dynamic"},
    "w8a8_compiled": {"quantize": "int8-dynamic", "compile": True},
    "w8a8rows_compiled": {"quantize": "int8-rows", "compile": True},
    "fp8": {"quantize": "fp8-dynamic"},
    "fp8_compiled": {"quantize": "fp8-dynamic", "compile": True},
    "fp8s": {"quantize": "fp8-static"},
    "fp8s_compiled": {"quantize": "fp8-static", "compile": True},
    "bf16_autotune": {"compile": "max-autotune-no-cudagraphs"},
    "fp8s_autotune": {"quantize": "fp8-static", "compile": "max-autotune-no-cudagraphs"},
    "sparse24": {"sparsity": "2:4"},
    "sparse24_compiled": {"sparsity": "2:4", "compile": True},
}
# The same numerics on the CPU, on the real weights, for agreement (speed there means nothing).
GPU_NUMERICS_ON_CPU = {"int8wo": {"quantize": "int8-weight-only"}, "w8a8": {"quantize": "int8-dynamic"},
                       "fp8": {"quantize": "fp8-dynamic"}, "fp8s": {"quantize": "fp8-static"},
                       "sparse24": {"sparsity": "2:4"}}


def cuda_variants(args) -> dict[str, dict]:
    import torch

    from gristmill.kernels.classify import ClassifierEngine
    path = random_minilm_classifier(Path(tempfile.mkdtemp(prefix="gristmill-variants-")) / "minilm-random")
    names = args.only.split(",") if args.only else list(GPU_VARIANTS)
    ids_all = None
    ref_logits = None
    out: dict[str, dict] = {}
    for name in ["fp32", *[n for n in names if n != "fp32"]]:
        kw = dict(GPU_VARIANTS[name])
        dtype = getattr(torch, kw.pop("dtype", "bfloat16"))
        try:
            eng = ClassifierEngine(path, device="cuda:0", max_length=128, dtype=dtype, **kw)
            if ids_all is None:
                ids_all = eng.encode(texts(args.batch * 8, 126, 126))
            # four input sets in rotation, so that no run re-reads the previous run's inputs from L2
            sets = [eng._pad(ids_all[i * args.batch:(i + 1) * args.batch]) for i in range(4)]
            with torch.inference_mode():
                t_warm = time.perf_counter()
                for i in range(3 if kw.get("compile") else 5):
                    logits = eng._forward(*sets[i % 4])
                torch.cuda.synchronize()
                warm_s = time.perf_counter() - t_warm
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(args.iters):
                    eng._forward(*sets[i % 4])
                stop.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(stop) / args.iters
                logits = eng._forward(*sets[0])
            if ref_logits is None:
                ref_logits = logits
            rel = float((logits - ref_logits).norm() / ref_logits.norm())
            out[name] = {"variant": eng.variant, "items_per_s": round(args.batch / ms * 1e3, 1),
                         "ms_per_batch": round(ms, 3), "logits_rel_err_vs_fp32": round(rel, 5),
                         "warmup_s": round(warm_s, 1)}
            del eng
            torch.cuda.empty_cache()
        except Exception as e:  # one variant that cannot run here must not hide the others
            out[name] = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    base = out.get("bf16", {}).get("items_per_s")
    for v in out.values():
        if "items_per_s" in v:
            v["speedup"] = round(v["items_per_s"] / out["fp32"]["items_per_s"], 2)
            if base:
                v["speedup_vs_bf16"] = round(v["items_per_s"] / base, 2)
    return out


def by_source(ref: list[dict], new: list[dict], heldout: list[str], thresholds: dict, builtin: bool) -> dict:
    """Agreement on each source of the held-out texts: the built-in set's three (standard-library
    sentences, held-out template sentences, the seed set), else the user's file as one."""
    from gristmill.kernels import corpus, heads
    from gristmill.kernels.optimize import agreement
    if builtin:
        docs, seed = set(corpus.stdlib_sentences()), {e.text for e in heads.load_seed()}
        source = ["seed set" if t in seed else "standard-library sentences" if t in docs else "template sentences"
                  for t in heldout]
    else:
        source = ["--texts"] * len(heldout)
    out = {}
    for name in dict.fromkeys(source):
        idx = [i for i, s in enumerate(source) if s == name]
        out[name] = {"texts": len(idx), **agreement([ref[i] for i in idx], [new[i] for i in idx], thresholds)}
    return out


CORE_NEAR_BAND = 0.5  # logits: about the band the student's cascade needs to keep 99.95% of flags


def by_core(ref: list[dict], new: list[dict], heldout: list[str], thresholds: dict) -> dict:
    """Flag errors (a label whose flag differs from the reference's) in all, and on the held-out
    template sentences by the core sentence each was built from (kernels/texts.py), most first. That
    set is 16 cores in many framings, so a few cores the full model scores near a threshold can hold
    most of a variant's errors, and its figure moves with them. `full_model_near`: the share of a
    core's texts the reference scores within CORE_NEAR_BAND logit of some threshold."""
    from gristmill.kernels import texts as builtin
    from gristmill.kernels.cascade import near
    cores = builtin.cores(heldout=True)
    rows: dict[str, dict] = {}
    total = 0
    for r, n, text in zip(ref, new, heldout):
        wrong = sum((r[k] >= t) != (n[k] >= t) for k, t in thresholds.items())
        total += wrong
        core = next((c for c in cores if c in text), None)
        if core is not None:
            row = rows.setdefault(core, {"core": core, "texts": 0, "flag_errors": 0, "full_model_near": 0})
            row["texts"] += 1
            row["flag_errors"] += wrong
            row["full_model_near"] += near(r, thresholds, CORE_NEAR_BAND)
    for row in rows.values():
        row["full_model_near"] = round(row["full_model_near"] / row["texts"], 4)
    return {"flag_errors": total, "labels": len(thresholds), "texts": len(heldout), "near_band": CORE_NEAR_BAND,
            "cores": sorted(rows.values(), key=lambda row: -row["flag_errors"])}


def main(argv: list[str] | None = None) -> int:
    from gristmill.kernels.loading import TRAIN_DEVICES
    from gristmill.producers.registry import DEFAULT_GENERATOR
    ap = argparse.ArgumentParser(prog="python -m benchmarks.engine_variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--texts", type=Path, help="held-out texts (plain lines or batch JSONL) for agreement")
    ap.add_argument("--student-steps", type=int, default=2000, help="distillation steps of the student (default 2000)")
    ap.add_argument("--train-device", choices=TRAIN_DEVICES, default="auto",
                    help="cpu variants: where the student trains (default auto: a GPU where CUDA has one)")
    ap.add_argument("--transfer-lines", type=int, default=30_000, help="built-in transfer texts (default 30,000)")
    ap.add_argument("--sample-lines", type=int, default=0, metavar="N",
                    help="also sample N transfer lines from --sampler (kernels/sampled.py, cached), as up to half the "
                         "transfer set (default 0)")
    ap.add_argument("--sampler", default=DEFAULT_GENERATOR.name, help="the chat model --sample-lines samples from")
    add_traffic_share_arg(ap, "the held-out texts")
    ap.add_argument("--cascade-flags", type=float, default=0.9995, help="the cascade's flag floor (default 0.9995)")
    ap.add_argument("--cascade-texts", type=float, default=0.995, help="its identical-texts floor (default 0.995)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512, help="cuda: batch size")
    ap.add_argument("--iters", type=int, default=50, help="cuda: timed batches")
    ap.add_argument("--only", help=f"cuda: comma-separated variants (default all: {', '.join(GPU_VARIANTS)})")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.device.startswith("cuda"):
        variants = cuda_variants(args)
    else:
        from gristmill.kernels.loading import training_device
        try:  # said in one line, as `gristmill optimize --train-device` says it
            train_device = training_device(args.train_device)
        except RuntimeError as e:
            ap.error(f"--train-device {args.train_device}: {e}")
        variants = cpu_variants(args, train_device)
    rows = []
    for name, v in variants.items():
        if "error" in v:
            rows.append((name, v["error"][:60], *["-"] * 10))
            continue
        a = v.get("agreement") or {}
        lab = v.get("labelled") or {}
        rows.append((name, v["variant"][:48], f"{v['items_per_s']:,.0f}", f"{v['speedup']:.2f}x",
                     f"{v['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in v else "-",
                     f"{a['flags']:.3%}" if a else f"rel err {v.get('logits_rel_err_vs_fp32', 0):.1e}",
                     f"{a['texts_identical']:.2%}" if a else "-",
                     f"{a['mean_score_delta']:.4f} / {a['max_score_delta']:.3f}" if a else "-",
                     f"{a['top_label']:.1%}" if a else "-",
                     f"{lab['macro_f1_change']:+.3f} ({lab['worst_label_f1_change']:+.3f})" if lab else "-",
                     f"{v['escalated']:.1%}" if "escalated" in v else "-",
                     f"{v['batch_independence']['texts_identical']:.2%}" if "batch_independence" in v else "-"))
    print(table(rows, ("variant", "engine", "items/s", "vs fp32", "vs bf16", "flags", "texts identical",
                       "score delta mean / max", "top label", "macro F1 change (worst label)", "escalated",
                       "same texts, shuffled batches: texts identical")))
    curve = variants.get("cascade", {}).get("band_curve")
    if curve:
        print("\nthe cascade at other bands (the student, and the fp32 model on what it escalates):")
        print(table([(f"{c['band']:.2f}", f"{c['escalated']:.1%}", f"{c['flags']:.3%}", f"{c['texts_identical']:.2%}",
                      f"{c['full_model_near']:.1%}")
                     for c in curve], ("band", "escalated", "flags", "texts identical", "full model's own near")))
    sources = variants.get("int8_pruned", {}).get("by_source")
    if sources:
        print("\nthe student by held-out source:")
        print(table([(name, f"{a['texts']:,}", f"{a['flags']:.3%}", f"{a['texts_identical']:.2%}")
                     for name, a in sources.items()], ("source", "texts", "flags", "texts identical")))
    cores = variants.get("int8_pruned", {}).get("by_core")
    if cores:
        print(f"\nthe student's flag errors on held-out template sentences, by core sentence ({cores['flag_errors']:,} "
              f"errors in all, of {cores['texts']:,} texts x {cores['labels']} labels):")
        print(table([(c["core"], f"{c['texts']:,}", f"{c['flag_errors']:,}", f"{c['flag_errors'] / cores['flag_errors']:.1%}",
                      f"{c['full_model_near']:.0%}") for c in cores["cores"] if c["flag_errors"]],
                    ("core", "texts", "flag errors", "share of all", f"fp32 within {cores['near_band']} of a threshold")))
    fronts = [(name, v["as_cascade_front"]) for name, v in variants.items() if "as_cascade_front" in v]
    if fronts:
        print(f"\neach variant as a cascade's first stage, in front of {variants['fp32']['variant']} "
              f"(band for flags >= {args.cascade_flags:.2%} and texts >= {args.cascade_texts:.1%} chosen on half the "
              f"held-out texts, figures on the other half; speed from the two stages' measured speeds; least: what "
              "any rule must escalate on that half to meet the floors, knowing the first stage's errors):")
        print(table([(name, f"{f['band']:.2f}" + ("" if f["floors_met_where_chosen"] else " (floors not met)"),
                      f"{f['escalated']:.1%}", f"{f['least_escalation']:.1%}", f"{f['flags']:.3%}",
                      f"{f['texts_identical']:.2%}", f"{f['speedup_estimate']:.2f}x") for name, f in fronts],
                    ("first stage", "band", "escalated", "least", "flags", "texts identical", "vs fp32 (estimate)")))
    served = [(name, v) for name, v in variants.items() if "escalated_each_batch" in v]
    if served:
        print("\nthe cascades end to end on the check half, through a micro-batcher as workers run them (fp32 timed the "
              f"same way: {served[0][1]['fp32_items_per_s']:,.0f} items/s): escalated inputs batched among themselves, "
              "against each batch's escalated inputs as their own call of the full model:")
        print(table([(name, f"{v['escalated']:.1%}", f"{v['items_per_s']:,.0f} ({v['speedup']:.2f}x)",
                      f"{v['escalated_each_batch']['items_per_s']:,.0f} ({v['escalated_each_batch']['speedup']:.2f}x)",
                      f"{v['items_per_s'] / v['escalated_each_batch']['items_per_s']:.2f}x") for name, v in served],
                    ("cascade", "escalated", "batched among themselves: items/s (vs fp32)",
                     "each batch's own call: items/s (vs fp32)", "ratio")))
    summary: dict = {"device": args.device, "variants": variants, "wall_s": round(time.perf_counter() - t0, 1)}
    # the fastest variant that keeps fp32's decisions to the cascade floors (on a GPU: the fastest)
    timed = {k: v for k, v in variants.items() if "speedup_vs_bf16" in v and k != "fp32" and
             ("agreement" not in v or (v["agreement"]["flags"] >= args.cascade_flags and
                                       v["agreement"]["texts_identical"] >= args.cascade_texts))}
    if timed:
        best = max(timed, key=lambda k: timed[k]["speedup_vs_bf16"])
        summary["best"] = {"variant": best, "speedup_vs_bf16": timed[best]["speedup_vs_bf16"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
