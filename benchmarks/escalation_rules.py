"""Which inputs a cascade should escalate: the band against other rules, on the same student.

    python -m benchmarks.escalation_rules ARTIFACT [--texts FILE] [--traffic-share F] [--predictor-texts N]

ARTIFACT is a `gristmill optimize --distill` artifact of the default classifier: a student, or a
cascade (its student is used). Its scores and fp32's of the held-out texts (workers/optimize
`heldout_texts`, or --texts; with --traffic-share, the part the student was not given) are
compared. Each rule is chosen, as `gristmill optimize` chooses the band, on the even-indexed texts
(the least escalation meeting both floors there) and judged on the odd-indexed ones, where the
escalated texts take fp32's rows. Judged at the policy's thresholds.

- `band`: escalate where any label's logit is within a band of its threshold's (the served rule;
  here the band is the least that meets the floors, where `optimize` tries steps of 0.05).
- `band per label`: from the band, each label's own band narrowed, one label after another, while
  both floors still hold on the pick half.
- `band + learned error`: the band widened by a per-text, per-label estimate of the student's logit
  error, |logit - threshold| < band + k * error, the error predicted from the student's pooled
  embedding and logits by a small MLP fit on texts the student was not distilled on (a draw of the
  built-in transfer set with its own seed, plus the traffic lines with --traffic-share); k and
  the band chosen together on the pick half.
- `z-score`: |logit - threshold| / predicted error < c.
- `band scaled per label`: each label's band in proportion to the student's RMS logit error on
  that label near its threshold, measured on the predictor's texts: one cut, no per-label fit.
- `least`: what a rule that knew the student's errors would escalate on the check half
  (kernels/cascade `least_escalation`): no rule escalates less and meets the floors.

Prints a table, then one JSON line: {"texts", "rules": {NAME: {"escalated_pick", "escalated",
"flags", "texts_identical", "floors_met"}}, "least_escalation", "error_corr"}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import add_traffic_share_arg, table, traffic_split

FLAGS_FLOOR, TEXTS_FLOOR = 0.9995, 0.995
PREDICTOR_SEED = 2  # the distillation draws the built-in transfer set with seed 0, the head refit with 1


@dataclass(frozen=True)
class RuleResult:
    escalated_pick: float
    escalated: float  # on the check half
    flags: float
    texts_identical: float

    @property
    def floors_met(self) -> bool:
        return self.flags >= FLAGS_FLOOR and self.texts_identical >= TEXTS_FLOOR

    def row(self, name: str) -> tuple:
        return (name, f"{self.escalated_pick:.1%}", f"{self.escalated:.1%}", f"{self.flags:.3%}",
                f"{self.texts_identical:.2%}", "yes" if self.floors_met else "no")


class Judge:
    """The student's flag errors against fp32 (texts x labels), and what a rule's escalations leave
    of them on either half."""

    def __init__(self, student_logits: np.ndarray, full_logits: np.ndarray, threshold_logits: np.ndarray):
        from gristmill.kernels.cascade import CHECK, PICK  # the halves `gristmill optimize` chooses and judges on
        self.wrong = (student_logits >= threshold_logits) != (full_logits >= threshold_logits)
        idx = np.arange(len(self.wrong))
        self.pick, self.check = idx[PICK], idx[CHECK]

    def kept(self, rows: np.ndarray, escalate: np.ndarray) -> tuple[float, float]:
        left = self.wrong[rows] & ~escalate[rows, None]
        return 1 - left.sum() / left.size, 1 - left.any(1).mean()

    def meets(self, rows: np.ndarray, escalate: np.ndarray) -> bool:
        flags, texts = self.kept(rows, escalate)
        return flags >= FLAGS_FLOOR and texts >= TEXTS_FLOOR

    def result(self, escalate: np.ndarray) -> RuleResult:
        flags, texts = self.kept(self.check, escalate)
        return RuleResult(round(float(escalate[self.pick].mean()), 4), round(float(escalate[self.check].mean()), 4),
                          round(float(flags), 5), round(float(texts), 4))

    def least_cut(self, score: np.ndarray) -> tuple[np.ndarray, float]:
        """(which texts to escalate, the cut): those whose smallest `score` (texts x labels) is under
        the least cut that meets the floors on the pick half; every text where none does."""
        lowest = score.min(1)
        for cut in np.unique(lowest[self.pick]):
            escalate = lowest < cut
            if self.meets(self.pick, escalate):
                return escalate, float(cut)
        return np.ones(len(lowest), dtype=bool), math.inf


def per_label_bands(judge: Judge, margin: np.ndarray, band: float, step: float = 0.05) -> np.ndarray:
    """Each label's band narrowed from `band`, label by label, while both floors hold on the pick half."""
    bands = np.full(margin.shape[1], band)
    for label in range(margin.shape[1]):
        while bands[label] >= step:
            trial = bands.copy()
            trial[label] -= step
            if not judge.meets(judge.pick, (margin < trial).any(1)):
                break
            bands = trial
    return (margin < bands).any(1)


def label_error_spread(student_logits: np.ndarray, full_logits: np.ndarray, threshold_logits: np.ndarray,
                       near: float = 1.0) -> np.ndarray:
    """Per label, the student's RMS logit error on the texts the full model puts within `near` logit
    of the label's threshold, relative to the mean over labels (1 where a label has none)."""
    errors = student_logits - full_logits
    close = np.abs(full_logits - threshold_logits) < near
    rms = np.array([np.sqrt(np.mean(errors[close[:, j], j] ** 2)) if close[:, j].any() else np.nan
                    for j in range(errors.shape[1])])
    rms = np.where(np.isnan(rms), np.nanmean(rms), rms)
    return rms / rms.mean()


def error_predictor(features: np.ndarray, errors: np.ndarray, *, epochs: int = 60, seed: int = 0):
    """A small MLP from a text's features to log(|logit error| + 0.01) per label."""
    import torch
    torch.manual_seed(seed)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(np.log(np.abs(errors) + 0.01), dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for j in torch.randperm(len(x)).split(256):
            loss = (net(x[j]) - y[j]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def predict(f: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.exp(net(torch.tensor(f, dtype=torch.float32)).numpy())
    return predict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.escalation_rules", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--texts", type=Path, help="held-out texts (plain lines or batch JSONL)")
    ap.add_argument("--predictor-texts", type=int, default=12000,
                    help="built-in transfer texts the error predictor is fit on (default 12000)")
    add_traffic_share_arg(ap, "the held-out texts")
    args = ap.parse_args(argv)
    from gristmill.kernels.cascade import MANIFEST_KIND
    from gristmill.kernels.onnx_engine import MANIFEST, read_manifest
    if not (args.artifact / MANIFEST).is_file():
        ap.error(f"not an artifact directory (no {MANIFEST}): {args.artifact}")
    manifest = read_manifest(args.artifact)
    student_dir = args.artifact / manifest["student"] if manifest.get("kind") == MANIFEST_KIND else args.artifact

    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.kernels.corpus import builtin_transfer_set
    from gristmill.kernels.optimize import artifact_engine, throughput
    from gristmill.producers.registry import DEFAULT_CLASSIFIER
    from gristmill.workers.loading import classifier_kwargs
    from gristmill.workers.optimize import decision_thresholds, heldout_texts
    spec = DEFAULT_CLASSIFIER
    kw = classifier_kwargs(spec)
    traffic, judged = traffic_split(heldout_texts(args.texts), args.traffic_share)
    full = ClassifierEngine(spec.resolve_path(), cpu_precision="fp32", **kw)
    student = artifact_engine(student_dir, **kw)
    labels = list(full.labels)
    th = decision_thresholds(spec, labels)
    threshold_logits = np.array([math.log(th[k] / (1 - th[k])) for k in labels])

    def logits(engine, texts: list[str]) -> np.ndarray:
        p = np.clip(np.array([[r[k] for k in labels] for r in throughput(engine, texts, repeats=1)[1]]), 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    def features(texts: list[str], z: np.ndarray) -> np.ndarray:
        ids = student.encode(texts)
        emb = np.concatenate([student.embed(ids[i:i + 64]).numpy() for i in range(0, len(ids), 64)])
        return np.concatenate([emb, z, np.abs(z - threshold_logits)], 1)

    print(f"scoring {len(judged)} held-out texts and {args.predictor_texts} + {len(traffic)} predictor texts",
          file=sys.stderr, flush=True)
    zs, zt = logits(student, judged), logits(full, judged)
    fit_texts = builtin_transfer_set(args.predictor_texts, spec.resolve_path(), seed=PREDICTOR_SEED) + traffic
    fit_zs, fit_zt = logits(student, fit_texts), logits(full, fit_texts)
    predict = error_predictor(features(fit_texts, fit_zs), fit_zs - fit_zt)
    spread = label_error_spread(fit_zs, fit_zt, threshold_logits)
    error = predict(features(judged, zs))
    error_corr = float(np.corrcoef(np.log(error).ravel(), np.log(np.abs(zs - zt) + 0.01).ravel())[0, 1])

    judge = Judge(zs, zt, threshold_logits)
    margin = np.abs(zs - threshold_logits)
    band_escalate, band = judge.least_cut(margin)
    rules = {"band": judge.result(band_escalate),
             "band per label": judge.result(per_label_bands(judge, margin, band))}
    learned = [judge.least_cut(margin - k * error)[0] for k in (0.25, 0.5, 1.0, 2.0)]
    rules["band + learned error"] = judge.result(min(learned, key=lambda e: (not judge.meets(judge.pick, e),
                                                                              e[judge.pick].mean())))
    rules["z-score"] = judge.result(judge.least_cut(margin / error)[0])
    rules["band scaled per label"] = judge.result(judge.least_cut(margin / spread)[0])
    from gristmill.kernels.cascade import least_escalation

    def rows(z: np.ndarray, idx: np.ndarray) -> list[dict[str, float]]:
        return [dict(zip(labels, 1 / (1 + np.exp(-z[i])))) for i in idx]
    least = least_escalation(rows(zs, judge.check), rows(zt, judge.check), th,
                             flags_floor=FLAGS_FLOOR, texts_floor=TEXTS_FLOOR)
    print(f"{student_dir}: {len(judged)} held-out texts ({len(judge.check)} judged), band {band:.3f} logit; "
          f"the student changes {judge.wrong[judge.check].any(1).mean():.2%} of the judged texts' flags; "
          f"predicted against actual log error: correlation {error_corr:.2f}")
    print(table([r.row(name) for name, r in rules.items()] + [("least (knows the errors)", "", f"{least:.1%}", "", "", "")],
                ("rule", "escalated (pick)", "escalated (check)", "flags", "texts identical", "floors met")))
    print(json.dumps({"texts": len(judged), "band": round(band, 4), "least_escalation": least,
                      "error_corr": round(error_corr, 3),
                      "rules": {name: {**r.__dict__, "floors_met": r.floors_met} for name, r in rules.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
