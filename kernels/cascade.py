"""A cascade (adaptive compute): a small student scores every input; an input with any label's
score near its threshold is scored again by the full model, whose scores then stand.

Near means within `band` of the threshold in logit space, |logit(score) - logit(threshold)| <
band, where a student's error matters; for a single-label model, also a top-2 margin under
`margin`. `gristmill optimize --cascade` picks the band on held-out text so that the cascade's
decisions agree with the full model's to a floor, and stores it with the artifact.

Each row of `run` carries, beside the label scores, `ESCALATED` = 1.0 when the full model decided
it and 0.0 when the student did: provenance names the model that decided each input, and the score
cache keeps it with the scores.

The full model may itself be a cascade (three stages: the student, a middle stage such as int8-rows
with a band of its own, the full model): the student's escalated inputs go to the middle stage, and
only those near a threshold there reach the full model. Its rows carry `MIDDLE` too, 1.0 where the
middle stage decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ESCALATED = "_escalated"
MIDDLE = "_middle"  # a three-stage cascade's rows: 1.0 where the middle stage decided
MANIFEST_KIND = "cascade"
# The full model decides the escalated inputs in fp32 on a CPU, the precision the band is judged
# against. Those inputs lie near a threshold by construction, which is where bf16's rounding flips
# decisions: on 611 built-in held-out texts bf16 changed 3 texts' flags, all of them among the
# student's escalated ones, and took its cascade from 99.51% of texts identical to 99.02%
# (benchmarks/README.md, "The full model decides the escalated inputs in fp32").
FULL_MODEL_PRECISION = "fp32"


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def near(scores: dict[str, float], thresholds: dict[str, float | list[float]], band: float,
         margin: float = 0.0) -> bool:
    """Whether a student row is too close to a decision to keep. A label may have several
    thresholds (a cascade serves batches under different policies): near any of them counts."""
    for label, ts in thresholds.items():
        s = scores.get(label)
        if s is None:
            continue
        ls = _logit(s)
        for t in ts if isinstance(ts, list) else (ts,):
            if abs(ls - _logit(t)) < band:
                return True
    if margin > 0.0 and len(scores) > 1:
        top2 = sorted(scores.values(), reverse=True)[:2]
        return top2[0] - top2[1] < margin
    return False


def combine(student_rows: list[dict[str, float]], teacher_of, thresholds: dict[str, float | list[float]],
            band: float, margin: float = 0.0, first_stage: dict[str, float] | None = None) -> list[dict[str, float]]:
    """The cascade's rows: the student's, except those near a threshold, which `teacher_of(indexes)`
    scores again (one call, in order). Each row gains ESCALATED; the student's also `first_stage`."""
    redo = [i for i, r in enumerate(student_rows) if near(r, thresholds, band, margin)]
    again = teacher_of(redo) if redo else []
    if len(again) != len(redo):
        raise RuntimeError(f"the full model returned {len(again)} rows for {len(redo)} escalated inputs")
    kept = first_stage or {ESCALATED: 0.0}
    out = [{**r, **kept} for r in student_rows]
    for i, r in zip(redo, again):
        out[i] = {**r, ESCALATED: 1.0}
    return out


def full_model_near(reference: list[dict[str, float]], thresholds: dict[str, float | list[float]], band: float,
                    margin: float = 0.0) -> float:
    """The share of texts whose full-model scores already lie within `band` of a threshold: about
    what a cascade at `band` escalates even with a student that matched the full model exactly. On
    text dense with borderline cases it bounds what any cascade can save: a band narrower than the
    student's errors loses decisions, a wider one escalates at least this much."""
    if not reference:
        return 0.0
    return sum(near(r, thresholds, band, margin) for r in reference) / len(reference)


def estimated_speedup(first_speedup: float, escalated: float, *, middle_speedup: float | None = None,
                      to_full: float | None = None) -> float:
    """A cascade's speed against fp32, estimated from its stages': the first stage (at
    `first_speedup`) on every input, and the full model, in fp32 (FULL_MODEL_PRECISION), again on the
    `escalated` share, in full batches. With a middle stage, the `escalated` share goes through it
    (at `middle_speedup`) and the `to_full` share (of all inputs) on to the full model."""
    if middle_speedup is None:
        return 1 / (1 / first_speedup + escalated)
    return 1 / (1 / first_speedup + escalated / middle_speedup + (to_full or 0.0))


def least_escalation(first: list[dict[str, float]], full: list[dict[str, float]], thresholds: dict[str, float],
                     *, flags_floor: float, texts_floor: float) -> float:
    """The smallest share of texts any escalation rule must send to the full model for `first`'s
    rows to meet both floors against `full`'s: what a rule that knew `first`'s errors would send,
    the texts with the most flag errors first. No band (nor any other rule) escalates less and meets
    the floors, so where this exceeds a cap on escalation, the first stage itself must improve."""
    if not first:
        return 0.0
    wrong = sorted((sum((f[k] >= t) != (s[k] >= t) for k, t in thresholds.items() if k in f)
                    for s, f in zip(first, full)), reverse=True)
    wrong = [w for w in wrong if w]
    flags_allowed = (1 - flags_floor) * len(first) * len(thresholds)
    texts_allowed = (1 - texts_floor) * len(first)
    sent, flag_errors = 0, sum(wrong)
    eps = 1e-9
    while sent < len(wrong) and (len(wrong) - sent > texts_allowed + eps or flag_errors > flags_allowed + eps):
        flag_errors -= wrong[sent]
        sent += 1
    return round(sent / len(first), 5)


def escalations(results: list) -> list[bool] | None:
    """For a cascade's rows, whether a later stage than the student decided each; None for any other
    engine's."""
    if not results or not isinstance(results[0], dict) or ESCALATED not in results[0]:
        return None
    return [bool(r[ESCALATED]) for r in results]


def deciders(results: list) -> list[str] | None:
    """For a cascade's rows, the stage that decided each: "student", "middle" (a three-stage
    cascade's) or "full"; None for any other engine's."""
    up = escalations(results)
    if up is None:
        return None
    return ["middle" if u and r.get(MIDDLE) else "full" if u else "student" for u, r in zip(up, results)]


class CascadeEngine:
    """Two classifier engines over the same tokenizer and labels: `student` for every input,
    `teacher` for the escalated ones, in the same call (so in the same device batch's time)."""

    def __init__(self, student, teacher, *, band: float, thresholds: dict[str, float | list[float]],
                 margin: float = 0.0,
                 variant: str = "cascade", revision: str = ""):
        if list(student.labels) != list(teacher.labels):
            raise ValueError(f"student labels {student.labels} differ from the full model's {teacher.labels}")
        self.student, self.teacher = student, teacher
        self.band, self.margin = band, margin
        self.thresholds = {k: v for k, v in thresholds.items() if k in teacher.labels}
        self.labels = list(teacher.labels)
        self.three_stages = isinstance(teacher, CascadeEngine)
        # what the score cache keeps per input
        self.score_fields = [*self.labels, ESCALATED, *([MIDDLE] if self.three_stages else [])]
        self._first_stage = {ESCALATED: 0.0, **({MIDDLE: 0.0} if self.three_stages else {})}  # on the student's rows
        self.variant = f"{variant}({student.variant}>{teacher.variant})"
        self.revision = revision or f"{student.revision}+{teacher.revision}"
        self.device = teacher.device

    # the tokenizer and its counters are the teacher's (the student was made from it)
    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.teacher.encode(texts)

    @property
    def chunk_cache(self):
        return self.teacher.chunk_cache

    @property
    def ascii_tokenizer(self):
        return self.teacher.ascii_tokenizer

    def run(self, batch: list[list[int]]) -> list[dict[str, Any]]:
        """Both stages in one call: the escalated inputs of this batch alone go to the full model.
        A worker runs the stages apart instead (`screen`, then `decide` on escalated inputs batched
        among themselves: workers/host.py), so that a few escalated inputs per batch do not each
        pay a call of the full model."""
        if not batch:
            return []
        return combine(self.student.run(batch), lambda idx: self._later([batch[i] for i in idx]),
                       self.thresholds, self.band, self.margin, first_stage=self._first_stage)

    def screen(self, batch: list[list[int]]) -> list[dict[str, Any] | None]:
        """The first stage: the student's rows (ESCALATED 0.0), None where an input is near a
        threshold and a later stage must decide it."""
        return [None if near(r, self.thresholds, self.band, self.margin) else {**r, **self._first_stage}
                for r in self.student.run(batch)] if batch else []

    def decide(self, batch: list[list[int]]) -> list[dict[str, Any]]:
        """The later stages, for inputs `screen` escalated: the full model's rows (ESCALATED 1.0), or
        a middle stage's (MIDDLE 1.0 too) where the full model is a cascade that kept them."""
        return self._later(batch)

    def _later(self, batch: list[list[int]]) -> list[dict[str, Any]]:
        if not batch:
            return []
        rows = self.teacher.run(batch)
        if self.three_stages:  # the inner cascade's first stage is this one's middle
            return [{**r, ESCALATED: 1.0, MIDDLE: 1.0 - r[ESCALATED]} for r in rows]
        return [{**r, ESCALATED: 1.0} for r in rows]

    def check_health(self) -> bool:
        return len(self.run(self.encode(["health check"]))) == 1

    def shutdown(self) -> None:
        self.student.shutdown()
        self.teacher.shutdown()


def escalate(student: list[dict[str, float]], full: list[dict[str, float]], thresholds: dict[str, float | list[float]],
             band: float, margin: float = 0.0) -> tuple[list[dict[str, float]], list[bool]]:
    """A cascade's rows judged offline, with the full model's scores of the same texts standing in
    for its answers: (rows, which were escalated)."""
    up = [near(s, thresholds, band, margin) for s in student]
    return [f if u else s for s, f, u in zip(student, full, up)], up


def choose_band(student: list[dict[str, float]], teacher: list[dict[str, float]], thresholds: dict[str, float],
                *, flags_floor: float, texts_floor: float, margin: float = 0.0,
                bands: tuple[float, ...] = tuple(b / 20 for b in range(0, 161)),
                reference: list[dict[str, float]] | None = None) -> tuple[float, dict]:
    """The narrowest band (logit units) whose cascade agrees with the full model's flags on these
    texts to both floors: (band, {flags, texts_identical, escalated}); the widest band tried if none
    reaches them. The escalated texts take `teacher`'s rows; where those are a later cascade's
    (three stages), `reference` holds the full model's own, the ones agreement is judged against."""
    from .optimize import agreement
    stats: dict = {}
    for band in bands:
        rows, up = escalate(student, teacher, thresholds, band, margin)
        a = agreement(reference or teacher, rows, thresholds)
        stats = {"flags": a["flags"], "texts_identical": a["texts_identical"], "escalated": round(sum(up) / len(up), 5)}
        if a["flags"] >= flags_floor and a["texts_identical"] >= texts_floor:
            return band, stats
    return bands[-1], stats


# Held-out texts split in two: the band is chosen on one half and judged on the other.
PICK, CHECK = slice(0, None, 2), slice(1, None, 2)


@dataclass(frozen=True)
class HalvesJudgement:
    """A cascade's band chosen on the PICK half of some held-out texts, and what it escalates and
    keeps on the CHECK half."""
    band: float
    chosen_on: dict  # the PICK half's {flags, texts_identical, escalated} at that band
    texts: int  # in the CHECK half
    escalated: float
    agreement: dict  # kernels.optimize.agreement of the cascade's rows against the full model's
    full_model_near: float  # the share the full model's own scores put within the band
    least_escalation: float  # the share any rule must escalate to meet the floors (`least_escalation`)

    def floors_met_where_chosen(self, flags_floor: float, texts_floor: float) -> bool:
        return self.chosen_on["flags"] >= flags_floor and self.chosen_on["texts_identical"] >= texts_floor


def judge_on_halves(student: list[dict[str, float]], full: list[dict[str, float]], thresholds: dict[str, float],
                    *, flags_floor: float, texts_floor: float,
                    escalate_at: dict[str, float | list[float]] | None = None,
                    later: list[dict[str, float]] | None = None) -> HalvesJudgement:
    """Choose the band on the PICK half of `student`'s and `full`'s scores of the same texts (to the
    floors, at `thresholds`), and judge it on the CHECK half; `escalate_at`: the thresholds the
    served cascade escalates near, where they are more than the ones judged (default the same);
    `later`: the rows the escalated texts get where a middle stage stands before the full model
    (default `full`'s own), judged against `full`'s."""
    from .optimize import agreement
    later = later or full
    band, picked = choose_band(student[PICK], later[PICK], thresholds, flags_floor=flags_floor,
                               texts_floor=texts_floor, reference=full[PICK])
    at = escalate_at or thresholds
    rows, up = escalate(student[CHECK], later[CHECK], at, band)
    return HalvesJudgement(band, picked, len(up), round(sum(up) / len(up), 4), agreement(full[CHECK], rows, thresholds),
                           round(full_model_near(full[CHECK], at, band), 4),
                           least_escalation(student[CHECK], full[CHECK], thresholds, flags_floor=flags_floor,
                                            texts_floor=texts_floor))


@dataclass(frozen=True)
class ThreeStageJudgement:
    """A three-stage cascade's two bands, chosen together on the PICK half, and what it gives on the
    CHECK half: `judged` is the student's band's judgement (its figures those of all three stages'
    rows), `to_full` the share of the CHECK half's texts that reach the full model."""
    middle_band: float
    judged: HalvesJudgement
    to_full: float
    tried: list[dict]  # per middle band: the student's band it needs and the PICK half's estimate


def judge_three_stages(student: list[dict[str, float]], middle: list[dict[str, float]], full: list[dict[str, float]],
                       thresholds: dict[str, float], *, flags_floor: float, texts_floor: float,
                       first_speedup: float, middle_speedup: float,
                       escalate_at: dict[str, float | list[float]] | None = None,
                       middle_bands: tuple[float, ...] = tuple(b / 20 for b in range(0, 11))) -> ThreeStageJudgement:
    """The bands of a cascade of `student`, then `middle` (with a band of its own), then the full
    model, from their scores of the same texts: for each middle band, the narrowest student band
    whose rows (the middle stage's, and the full model's within the middle band) meet both floors on
    the PICK half; of those pairs, the one whose estimated speed (`estimated_speedup`, at the stages'
    measured speeds) is highest there. A wider middle band sends more to fp32 but leaves more of the
    floors' allowance to the student's band, which then escalates less. Judged on the CHECK half."""
    at = escalate_at or thresholds
    best: tuple[float, float, HalvesJudgement] | None = None
    tried = []
    for mb in middle_bands:
        later = escalate(middle, full, at, mb)[0]
        judged = judge_on_halves(student, full, thresholds, flags_floor=flags_floor, texts_floor=texts_floor,
                                 escalate_at=at, later=later)
        picked = student[PICK]
        escalated = sum(near(s, at, judged.band) for s in picked) / len(picked)
        estimate = estimated_speedup(first_speedup, escalated, middle_speedup=middle_speedup,
                                     to_full=_to_full(picked, middle[PICK], at, judged.band, mb))
        met = judged.floors_met_where_chosen(flags_floor, texts_floor)
        tried.append({"middle_band": mb, "band": judged.band, "floors_met": met, "estimate": round(estimate, 3)})
        if met and (best is None or estimate > best[0]):
            best = (estimate, mb, judged)
    if best is None:  # no pair meets the floors: the widest bands tried, judged all the same
        best = (0.0, middle_bands[-1], judged)
    _, mb, judged = best
    return ThreeStageJudgement(mb, judged, round(_to_full(student[CHECK], middle[CHECK], at, judged.band, mb), 4),
                               tried)


def _to_full(student: list[dict[str, float]], middle: list[dict[str, float]], at: dict[str, float | list[float]],
             band: float, middle_band: float) -> float:
    """The share of texts a three-stage cascade passes on to the full model: near a threshold in
    both the student's rows (within `band`) and the middle stage's (within `middle_band`)."""
    on = [near(s, at, band) and near(m, at, middle_band) for s, m in zip(student, middle)]
    return sum(on) / len(on) if on else 0.0
