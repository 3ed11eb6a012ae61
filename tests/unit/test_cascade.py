"""The distilled student and the cascade: their pure parts, then the whole optimize -> register ->
host path on the tests' tiny encoder."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

from gristmill.kernels.cascade import (  # noqa: E402
    ESCALATED, MIDDLE, CascadeEngine, choose_band, combine, deciders, escalate, estimated_speedup, full_model_near,
    judge_on_halves, judge_three_stages, least_escalation, near)
from gristmill.kernels.distill import DistillLoss, StudentShape, distill_student, make_student  # noqa: E402

TH = {"a": 0.5, "b": 0.3}


@pytest.mark.parametrize("fraction,layers,keep", [(0.0, 6, (0, 1, 2, 3, 4, 5)), (0.5, 6, (0, 2, 5)),
                                                  (0.34, 6, (0, 2, 3, 5)), (0.9, 6, (5,)), (0.5, 2, (1,))])
def test_a_student_keeps_evenly_spaced_layers_first_and_last(fraction, layers, keep):
    assert StudentShape.for_fraction(fraction, layers).keep_layers == keep


def test_make_student_drops_layers_and_says_so_in_its_config(weights):
    from transformers import AutoModel
    teacher = AutoModel.from_pretrained(str(weights / "encoder"), attn_implementation="eager").eval()
    student = make_student(teacher, StudentShape.for_fraction(0.5, 2))
    assert len(student.encoder.layer) == 1 and student.config.num_hidden_layers == 1
    assert torch.equal(student.encoder.layer[0].output.dense.weight, teacher.encoder.layer[1].output.dense.weight)
    assert len(teacher.encoder.layer) == 2  # the teacher is untouched
    ids = torch.tensor([[1, 5, 7, 2]])
    assert student(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.shape == (1, 4, 32)


def _tiny_student(weights):
    from transformers import AutoModel, AutoTokenizer
    teacher = AutoModel.from_pretrained(str(weights / "encoder"), attn_implementation="eager").eval()
    return teacher, make_student(teacher, StudentShape.for_fraction(0.5, 2)), AutoTokenizer.from_pretrained(
        str(weights / "encoder"))


def test_distill_stops_where_on_step_says_and_reports_the_steps_run(weights):
    teacher, student, tok = _tiny_student(weights)
    seen = []
    report = distill_student(teacher, student, tok, [f"text number {i}" for i in range(40)], steps=10, max_length=16,
                             batch=8, on_step=lambda step: seen.append(step) or step >= 3)
    assert seen == [1, 2, 3] and report.steps == 3 and not student.training


def test_the_boundary_weight_weighs_logit_errors_near_a_threshold(weights):
    """Off by default (the default recipe's student is unchanged); on, it changes what is learnt."""
    head = (torch.randn(3, 32), torch.zeros(3))
    texts = [f"text number {i}" for i in range(40)]
    trained = []
    for loss in (DistillLoss(), DistillLoss(boundary=0.0, boundary_tau=0.1), DistillLoss(boundary=50.0)):
        teacher, student, tok = _tiny_student(weights)
        distill_student(teacher, student, tok, texts, steps=4, max_length=16, batch=8, head=head,
                        thresholds=[0.5, 0.5, 0.5], loss_weights=loss)
        trained.append(student.encoder.layer[0].output.dense.weight.detach().clone())
    assert torch.equal(trained[0], trained[1])  # tau alone does nothing while the weight is 0
    assert not torch.equal(trained[0], trained[2])


def test_the_tail_term_is_off_by_default_and_trains_a_student_when_on(weights):
    """Off, the student is the default recipe's (the margin alone changes nothing); on, it changes
    what is learnt; and a margin beyond every error leaves the term at zero."""
    from gristmill.kernels.distill import teacher_targets
    texts = [f"text number {i}" for i in range(40)]
    w = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    teacher, _, tok = _tiny_student(weights)
    head = (w, -(teacher_targets(teacher, tok, texts, 16) @ w.T).mean(0))  # the teacher's logits around 0.5's
    trained, losses = [], []
    for loss in (DistillLoss(), DistillLoss(tail_margin=0.0), DistillLoss(tail=50.0, tail_margin=0.0),
                 DistillLoss(tail=50.0, tail_margin=1e6)):
        teacher, student, tok = _tiny_student(weights)
        report = distill_student(teacher, student, tok, texts, steps=4, max_length=16, batch=8, head=head,
                                 thresholds=[0.5, 0.5, 0.5], loss_weights=loss)
        trained.append(student.encoder.layer[0].output.dense.weight.detach().clone())
        losses.append(report.losses[-1])
    assert torch.equal(trained[0], trained[1]) and torch.equal(trained[0], trained[3])
    assert not torch.equal(trained[0], trained[2]) and losses[2] > losses[0]


def test_the_attention_term_is_zero_for_the_teacher_itself_and_trains_a_student_when_on(weights):
    from gristmill.kernels import distill
    teacher, student, tok = _tiny_student(weights)
    enc = tok(["a short text", "a somewhat longer text with more words in it"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    own = teacher(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert distill._attention_kl(own, own, mask).item() == pytest.approx(0.0, abs=1e-6)
    shifted = student(input_ids=ids, attention_mask=mask, output_attentions=True).attentions  # layer 1's
    assert distill._attention_kl(own[:1], shifted, mask).item() > 1e-4
    texts = [f"text number {i}" + " with some words" * (i % 4) for i in range(40)]
    trained = []
    for loss in (DistillLoss(), DistillLoss(attention=1.0)):
        teacher, student, tok = _tiny_student(weights)
        distill_student(teacher, student, tok, texts, steps=4, max_length=16, batch=8,
                        keep_layers=StudentShape.for_fraction(0.5, 2).keep_layers, loss_weights=loss)
        trained.append(student.encoder.layer[0].attention.self.query.weight.detach().clone())
    assert not torch.equal(trained[0], trained[1])


def test_cached_teacher_states_train_the_student_the_per_step_teacher_would(weights):
    """The kept layers' teacher states, computed once (fp16), stand in for a teacher forward per step."""
    from gristmill.kernels import distill
    texts = [f"text number {i}" + " with some words" * (i % 4) for i in range(40)]
    trained, losses = [], []
    for cache in (0, distill.STATE_CACHE_BYTES):
        teacher, student, tok = _tiny_student(weights)
        shape = StudentShape.for_fraction(0.5, 2)
        report = distill_student(teacher, student, tok, texts, steps=6, max_length=16, batch=8,
                                 keep_layers=shape.keep_layers, state_cache_bytes=cache)
        trained.append(student.encoder.layer[0].output.dense.weight.detach().clone())
        losses.append(report.losses[-1])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert torch.allclose(trained[0], trained[1], atol=1e-4)
    teacher, _, tok = _tiny_student(weights)
    cached = distill._teacher_pass(teacher, tok, texts[:5], 16, layers=(1,), cache_bytes=1 << 20)
    assert [s.shape[:2] for s in cached.states] == [(min(16, len(tok(t)["input_ids"])), 1) for t in texts[:5]]
    # as they go to a GPU: in one copy, each text's states unchanged
    moved = distill.states_on(cached.states, torch.device("cpu"))
    assert len(moved) == 5 and all(torch.equal(a, b) for a, b in zip(moved, cached.states))
    assert distill._teacher_pass(teacher, tok, texts[:5], 16, layers=(1,), cache_bytes=10).states is None


def test_near_a_threshold_in_logit_space():
    assert near({"a": 0.51, "b": 0.01}, TH, band=0.1)
    assert not near({"a": 0.9, "b": 0.01}, TH, band=1.0)
    assert near({"a": 0.9, "b": 0.01}, TH, band=3.0)  # logit(0.9) - logit(0.5) = 2.2
    assert not near({"a": 0.51, "b": 0.01}, TH, band=0.0)
    assert near({"a": 0.01, "b": 0.02}, TH, band=0.0, margin=0.05)  # a single-label top-2 tie


def test_combine_rescores_only_the_near_ones_in_one_call():
    student = [{"a": 0.9, "b": 0.0}, {"a": 0.49, "b": 0.0}, {"a": 0.0, "b": 0.31}]
    calls = []

    def teacher(idx):
        calls.append(idx)
        return [{"a": 0.1, "b": 0.2} for _ in idx]
    rows = combine(student, teacher, TH, band=0.2)
    assert calls == [[1, 2]]
    assert [r[ESCALATED] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["a"] == 0.9 and rows[1] == {"a": 0.1, "b": 0.2, ESCALATED: 1.0}
    with pytest.raises(RuntimeError):
        combine(student, lambda idx: [], TH, band=0.2)


class _Scored:
    """An engine whose 'a' score is each input's first id / 100 (b: 0), counting its calls."""
    labels = ["a", "b"]
    variant, revision, device = "scored", "r", "cpu"

    def __init__(self):
        self.calls = []

    def run(self, batch):
        self.calls.append(len(batch))
        return [{"a": ids[0] / 100, "b": 0.0} for ids in batch]


def test_a_cascade_screens_then_decides_in_two_stages_as_run_does_in_one():
    student, full = _Scored(), _Scored()
    cascade = CascadeEngine(student, full, band=0.2, thresholds=TH)
    batch = [[90], [49], [10], [52]]
    screened = cascade.screen(batch)
    assert screened == [{"a": 0.9, "b": 0.0, ESCALATED: 0.0}, None, {"a": 0.1, "b": 0.0, ESCALATED: 0.0}, None]
    assert full.calls == []
    decided = cascade.decide([batch[1], batch[3]])
    assert decided == [{"a": 0.49, "b": 0.0, ESCALATED: 1.0}, {"a": 0.52, "b": 0.0, ESCALATED: 1.0}]
    whole = cascade.run(batch)
    assert whole == [screened[0], decided[0], screened[2], decided[1]]
    assert cascade.screen([]) == [] and cascade.decide([]) == [] and full.calls == [2, 2]


def test_a_cascade_can_stand_in_for_the_full_model_making_three_stages():
    """The student's escalated inputs go to a second cascade, which keeps its own first stage's rows
    but for the inputs nearer still, which the full model decides; each row names its stage."""
    class _Tagged(_Scored):
        def __init__(self, tag: float):
            super().__init__()
            self.tag = tag

        def run(self, batch):
            return [{**r, "a": r["a"] + self.tag} for r in super().run(batch)]

    student, middle, full = _Tagged(0.0), _Tagged(0.001), _Tagged(0.002)
    inner = CascadeEngine(middle, full, band=0.05, thresholds=TH)
    outer = CascadeEngine(student, inner, band=0.25, thresholds=TH)
    batch = [[90], [45], [49], [10]]
    rows = outer.run(batch)
    assert [round(r["a"], 3) for r in rows] == [0.9, 0.451, 0.492, 0.1]  # student, middle, full, student
    assert [r[ESCALATED] for r in rows] == [1.0 * x for x in (0, 1, 1, 0)]
    assert deciders(rows) == ["student", "middle", "full", "student"]
    assert middle.calls == [2] and full.calls == [1]
    assert outer.score_fields == ["a", "b", ESCALATED, MIDDLE] and all(set(r) == set(outer.score_fields) for r in rows)
    # a worker's two calls give the same rows: the student's screen, then the later stages together
    screened = outer.screen(batch)
    assert [r is None for r in screened] == [False, True, True, False]
    decided = outer.decide([batch[1], batch[2]])
    assert [screened[0], *decided, screened[3]] == [rows[0], rows[1], rows[2], rows[3]]
    # a two-stage cascade's rows carry no MIDDLE, and name the student or the full model
    two = CascadeEngine(student, full, band=0.25, thresholds=TH).run(batch)
    assert deciders(two) == ["student", "full", "full", "student"] and all(MIDDLE not in r for r in two)
    assert deciders([{"a": 0.1}]) is None and deciders([]) is None


class _Timed(_Scored):
    """An engine that takes `pause` seconds a batch and writes its name into `order` when its turn begins."""

    def __init__(self, name: str, pause: float, order: list[str]):
        super().__init__()
        self.name, self.pause, self.order, self.variant = name, pause, order, f"timed-{name}"

    def encode(self, texts):
        return [[i % 100] for i, _ in enumerate(texts)]

    def run(self, batch):
        import time
        if not self.order or self.order[-1] != self.name:
            self.order.append(self.name)
        time.sleep(self.pause)
        return super().run(batch)


def test_engines_timed_in_turns_alternate_and_each_keeps_its_best_round():
    """`timed_in_turns` (what `gristmill optimize` times a cascade and fp32 with): the engines take
    turns round by round, so that a slow moment falls on both, and the faster engine is faster."""
    from gristmill.workers.host import timed_in_turns
    order: list[str] = []
    texts = [f"text {i}" for i in range(128)]
    best, _ = timed_in_turns({"slow": _Timed("slow", 0.02, order), "fast": _Timed("fast", 0.002, order)}, texts, rounds=3)
    assert order == ["slow", "fast"] * 3 and best["fast"] > best["slow"] > 0


def test_an_artifact_is_timed_in_turns_with_fp32_and_the_hosts_default():
    """What `gristmill optimize` stores of every artifact's speed, and what a worker chooses its
    engine by: the artifact, fp32 and the default engine (bf16 where the host has it) timed in
    turns; where the default is fp32 itself, it is timed once a round."""
    from gristmill.workers.optimize import Reference
    order: list[str] = []
    texts = [f"text {i}" for i in range(128)]
    fp32, bf16, art = _Timed("fp32", 0.02, order), _Timed("bf16", 0.01, order), _Timed("artifact", 0.004, order)
    report = Reference(fp32, [], bf16).timed_with(art, texts).report()
    assert order == ["fp32", "artifact", "bf16"] * 3
    assert report["speedup"] > report["default"]["speedup"] > 1.0 and report["default"]["variant"] == "timed-bf16"
    assert report["speedup"] == round(report["items_per_s"] / report["fp32_items_per_s"], 2)
    order.clear()
    alone = Reference(fp32, [], fp32).timed_with(art, texts).report()
    assert order == ["fp32", "artifact"] * 3 and alone["default"] == {"variant": "timed-fp32", "speedup": 1.0}


def test_choose_band_is_the_narrowest_that_meets_the_floors():
    teacher = [{"a": 0.6, "b": 0.0}, {"a": 0.2, "b": 0.0}, {"a": 0.9, "b": 0.0}]
    student = [{"a": 0.45, "b": 0.0}, {"a": 0.25, "b": 0.0}, {"a": 0.95, "b": 0.0}]  # the first flips
    band, stats = choose_band(student, teacher, TH, flags_floor=1.0, texts_floor=1.0)
    assert near(student[0], TH, band) and stats["flags"] == 1.0 and stats["texts_identical"] == 1.0
    assert 0 < band <= 0.25 and stats["escalated"] == pytest.approx(1 / 3, abs=1e-4)


def test_a_band_is_chosen_on_one_half_and_judged_on_the_other():
    """Even-indexed texts choose the band; odd-indexed ones are judged, and their own errors show
    there: the band was not fitted to them."""
    full = [{"a": 0.6, "b": 0.0}, {"a": 0.6, "b": 0.0}, {"a": 0.2, "b": 0.0}, {"a": 0.7, "b": 0.0}]
    student = [{"a": 0.45, "b": 0.0},  # picked: flips near the threshold, so the band must reach it
               {"a": 0.45, "b": 0.0},  # checked: the same, escalated at that band
               {"a": 0.2, "b": 0.0},  # picked: right
               {"a": 0.2, "b": 0.0}]  # checked: flips far from the threshold, which no band chosen above catches
    judged = judge_on_halves(student, full, TH, flags_floor=1.0, texts_floor=1.0)
    assert 0 < judged.band <= 0.25 and judged.floors_met_where_chosen(1.0, 1.0)
    assert judged.texts == 2 and judged.escalated == 0.5
    assert judged.agreement["flags"] == 0.75 and judged.agreement["texts_identical"] == 0.5
    assert judged.full_model_near == 0.0
    # escalating near more thresholds than the ones judged (another policy's 0.2 for "a") catches the second
    wider = judge_on_halves(student, full, TH, flags_floor=1.0, texts_floor=1.0,
                            escalate_at={"a": [0.2, 0.5], "b": [0.3]})
    assert wider.escalated == 1.0 and wider.agreement["texts_identical"] == 1.0


def test_with_a_middle_stage_the_band_is_chosen_for_the_rows_it_gives_judged_against_the_full_model():
    """The escalated texts get the middle stage's rows, judged against the full model's: where the
    middle stage gets them wrong, no band meets the floors."""
    full = [{"a": 0.6, "b": 0.0}, {"a": 0.6, "b": 0.0}, {"a": 0.1, "b": 0.0}, {"a": 0.1, "b": 0.0}]
    student = [{"a": 0.45, "b": 0.0}, {"a": 0.45, "b": 0.0}, {"a": 0.2, "b": 0.0}, {"a": 0.2, "b": 0.0}]
    plain = judge_on_halves(student, full, TH, flags_floor=1.0, texts_floor=1.0)
    assert 0 < plain.band <= 0.25 and plain.agreement["texts_identical"] == 1.0
    assert judge_on_halves(student, full, TH, flags_floor=1.0, texts_floor=1.0, later=full) == plain
    later = [dict(r) for r in full]
    later[0]["a"] = later[1]["a"] = 0.4  # the middle stage flips the near ones too
    worse = judge_on_halves(student, full, TH, flags_floor=1.0, texts_floor=1.0, later=later)
    assert not worse.floors_met_where_chosen(1.0, 1.0) and worse.band == 8.0  # the widest band tried
    assert worse.agreement["flags"] == 0.75 and worse.agreement["texts_identical"] == 0.5
    band, stats = choose_band(student, later, TH, flags_floor=1.0, texts_floor=1.0, reference=full)
    assert band == 8.0 and stats["flags"] == 0.75


def test_three_stage_bands_are_chosen_together_for_the_highest_estimated_speed():
    """A middle stage wrong near a threshold: at middle band 0 the student's band must reach past
    the middle stage's errors (escalating everything), a middle band that catches them lets the
    student's band stay narrow, and wider middle bands only send more to fp32."""
    full = [{"a": 0.6, "b": 0.0}, {"a": 0.6, "b": 0.0}, {"a": 0.1, "b": 0.0}, {"a": 0.1, "b": 0.0}] * 2
    student = [{"a": 0.45, "b": 0.0}, {"a": 0.45, "b": 0.0}, {"a": 0.01, "b": 0.0}, {"a": 0.01, "b": 0.0}] * 2
    middle = [{"a": 0.48, "b": 0.0}, {"a": 0.48, "b": 0.0}, {"a": 0.1, "b": 0.0}, {"a": 0.1, "b": 0.0}] * 2
    three = judge_three_stages(student, middle, full, TH, flags_floor=1.0, texts_floor=1.0, first_speedup=4.0,
                               middle_speedup=2.0, middle_bands=(0.0, 0.1, 0.5))
    by_band = {t["middle_band"]: t for t in three.tried}
    assert not by_band[0.0]["floors_met"]  # the middle stage keeps its own wrong rows
    assert by_band[0.1]["floors_met"] and by_band[0.5]["floors_met"]
    assert by_band[0.1]["estimate"] == by_band[0.5]["estimate"]  # here the same texts reach fp32
    assert three.middle_band == 0.1 and three.judged.agreement["texts_identical"] == 1.0
    assert three.to_full == 0.5 and three.judged.escalated == 0.5  # the near half goes all the way
    # a middle stage that is right everywhere: band 0, and nothing reaches fp32
    exact = judge_three_stages(student, full, full, TH, flags_floor=1.0, texts_floor=1.0, first_speedup=4.0,
                               middle_speedup=2.0, middle_bands=(0.0, 0.1, 0.5))
    assert exact.middle_band == 0.0 and exact.to_full == 0.0 and exact.judged.agreement["flags"] == 1.0
    assert exact.tried[0]["estimate"] == pytest.approx(estimated_speedup(4.0, 0.5, middle_speedup=2.0, to_full=0.0),
                                                       abs=1e-3)


def test_full_model_near_is_what_a_flawless_student_would_escalate():
    full = [{"a": 0.52, "b": 0.01}, {"a": 0.9, "b": 0.01}, {"a": 0.1, "b": 0.29}, {"a": 0.1, "b": 0.01}]
    assert full_model_near(full, TH, band=0.1) == 0.5  # the first ("a") and the third ("b")
    assert full_model_near(full, TH, band=0.0) == 0.0
    assert full_model_near(full, TH, band=10.0) == 1.0
    assert full_model_near([], TH, band=0.1) == 0.0
    # a cascade whose student equals the full model escalates exactly that share
    band, stats = choose_band(full, full, TH, flags_floor=1.0, texts_floor=1.0, bands=(0.1,))
    assert stats["escalated"] == full_model_near(full, TH, band)


def test_the_estimated_speedup_prices_the_escalated_share_at_fp32():
    assert estimated_speedup(4.0, 0.0) == pytest.approx(4.0)
    assert estimated_speedup(4.0, 0.25) == pytest.approx(2.0)  # 1 / (0.25 + 0.25)
    assert estimated_speedup(2.0, 1.0) == pytest.approx(2 / 3)
    # a middle stage at 2x takes the escalated quarter, and a twentieth of all inputs goes on to fp32
    assert estimated_speedup(4.0, 0.25, middle_speedup=2.0, to_full=0.05) == pytest.approx(1 / (0.25 + 0.125 + 0.05))


def test_least_escalation_is_what_a_rule_that_knew_the_errors_would_send():
    """Texts with the most flag errors go first, until both floors hold; no band does better."""
    full = [{"a": 0.9, "b": 0.9}, {"a": 0.9, "b": 0.0}, {"a": 0.9, "b": 0.0}, {"a": 0.0, "b": 0.0}]
    first = [{"a": 0.1, "b": 0.1},  # two flags wrong
             {"a": 0.1, "b": 0.0},  # one wrong
             {"a": 0.9, "b": 0.0},  # right
             {"a": 0.0, "b": 0.0}]  # right
    assert least_escalation(first, full, TH, flags_floor=1.0, texts_floor=1.0) == 0.5
    # a quarter of the texts may differ: the worst one still goes, to keep 7 of 8 flags
    assert least_escalation(first, full, TH, flags_floor=0.875, texts_floor=0.75) == 0.25
    assert least_escalation(first, full, TH, flags_floor=0.5, texts_floor=0.5) == 0.0
    assert least_escalation(full, full, TH, flags_floor=1.0, texts_floor=1.0) == 0.0
    assert least_escalation([], [], TH, flags_floor=1.0, texts_floor=1.0) == 0.0
    for band in (0.0, 0.5, 1.0, 3.0, 10.0):  # every band that meets the floors escalates at least as much
        rows, up = escalate(first, full, TH, band)
        same = [all((r[k] >= t) == (f[k] >= t) for k, t in TH.items()) for r, f in zip(rows, full)]
        assert not all(same) or sum(up) / len(up) >= 0.5
    judged = judge_on_halves(first * 2, full * 2, TH, flags_floor=1.0, texts_floor=1.0)
    assert judged.least_escalation == 0.5


def test_optimize_distills_a_student_and_a_cascade_the_host_serves(tiny_models_file, tmp_path):
    """--distill --cascade on the tiny encoder: the student has half the layers, the cascade's
    band meets its floors on the held-out half, and a worker's host serves it, naming in each
    line's provenance which model decided."""
    from gristmill.producers import schemas as S
    from gristmill.producers.settings import Settings
    from gristmill.workers.batcher import Requeue
    from gristmill.workers.host import EngineHost, served_throughput
    from tests.tinymodels import build_cascade, through_batcher
    p, out, mf = build_cascade(tiny_models_file, tmp_path)
    texts = tmp_path / "heldout.txt"
    manifest = json.loads((out / "gristmill-artifact.json").read_text())
    student = json.loads((out / "student" / "gristmill-artifact.json").read_text())
    assert manifest["kind"] == "cascade" and manifest["teacher_model"] == "tiny-moderation"
    assert student["student"]["keep_layers"] == [1] and student["variant"] == "ort-int8-student1of2"
    assert student["student"]["train_device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --train-device auto
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report == manifest["report"] and 0.0 <= report["escalated"] <= 1.0
    assert set(report["agreement"]) >= {"flags", "texts_identical"}
    assert 0.0 <= report["full_model_near"] <= 1.0 and "The full model's own scores put" in p.stdout
    assert 0.0 <= report["least_escalation"] <= 1.0 and "any rule would escalate at least" in p.stdout
    a = report["agreement"]
    if a["flags"] >= 0.9995 and a["texts_identical"] >= 0.995:  # the band met the floors where judged
        assert report["escalated"] >= report["least_escalation"]
    assert report["speedup"] > 0 and report["speedup_estimate"] > 0 and "measured end to end" in p.stdout

    host = EngineHost(Settings(models_file=mf, builtin_models=False, home=tmp_path / "home", dedup_ttl_s=0))
    eng = host.engine("tiny-cascade")
    assert eng.variant.startswith("cascade(ort-int8-student1of2") and eng.band == manifest["band"]
    # the full model decides in the precision the band was judged against, whatever the CPU has
    assert manifest["full_model_precision"] == "fp32" and eng.teacher.variant == "torch-float32-cpu"
    eng.band = 100.0  # every input escalates: the full model decides
    item = S.WorkItem(1, "c1", "/v1/moderations", "tiny-cascade", {"input": ["i will hurt you", "hello"]}, "0" * 64)
    (prep,) = host.prepare([item])
    # the student's stage hands both back to the batcher, which runs them through the full model
    assert host.run("tiny-cascade", prep.payloads) == [Requeue("tiny-cascade\x00escalated")] * 2
    results = through_batcher(host, "tiny-cascade", prep.payloads)
    line = host.format(item, results)
    assert line["provenance"]["decided_by"] == ["full", "full"]
    # the full model's scores in fp32, whatever the worker serves the model itself in
    from gristmill.kernels.classify import ClassifierEngine
    from gristmill.workers.loading import classifier_kwargs
    spec = host.registry.specs["tiny-moderation"]
    full = ClassifierEngine(spec.resolve_path(), cpu_precision="fp32", **classifier_kwargs(spec)).run(prep.payloads)
    assert [{k: v for k, v in r.items() if k != ESCALATED} for r in results] == full and results == eng.run(prep.payloads)
    eng.band = 0.0  # none does: the student decides
    assert host.format(item, host.run("tiny-cascade", prep.payloads))["provenance"]["decided_by"] == ["student",
                                                                                                       "student"]
    # timed as a worker runs it, the cascade gives the rows it gives batch by batch
    eng.band = 1.0
    heldout = texts.read_text().splitlines()
    ips, rows = served_throughput(eng, heldout, batch=16, repeats=1)
    one_call = [r for i in range(0, len(heldout), 16) for r in eng.run(eng.encode(heldout[i:i + 16]))]
    assert ips > 0 and [r[ESCALATED] for r in rows] == [r[ESCALATED] for r in one_call]
    assert 0 < sum(r[ESCALATED] for r in rows) < len(rows)
    # (int8 activation ranges are set per batch, and the batches differ: scores agree to rounding)
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(rows, one_call))
    # the same, each batch's escalated inputs as their own call (the benchmark's comparison)
    rows_apart = served_throughput(eng, heldout, batch=16, repeats=1, stages=False)[1]
    assert [r[ESCALATED] for r in rows_apart] == [r[ESCALATED] for r in rows]
    host.shutdown()


def test_optimize_builds_a_three_stage_cascade_the_host_serves(tiny_models_file, tmp_path):
    """--middle int8: the full model in ONNX int8 between the student and fp32, with a band of its
    own; the manifest names it, the report gives what it sends on, and a worker's host serves the
    three stages, each line naming the stage that decided."""
    from gristmill.producers import schemas as S
    from gristmill.producers.settings import Settings
    from gristmill.workers.host import EngineHost
    from gristmill.workers.tasks import cascade_counts
    from tests.tinymodels import build_cascade, through_batcher
    p, out, mf = build_cascade(tiny_models_file, tmp_path, "--middle", "int8")
    manifest = json.loads((out / "gristmill-artifact.json").read_text())
    middle = json.loads((out / "middle" / "gristmill-artifact.json").read_text())
    assert manifest["middle"]["dir"] == "middle" and middle["variant"] == "ort-int8" and middle["prune"] == 0.0
    report = manifest["report"]
    assert report["middle"]["band"] == manifest["middle"]["band"] >= 0.0
    assert 0.0 <= report["middle"]["to_full"] <= report["escalated"] <= 1.0
    assert [t["middle_band"] for t in report["middle"]["bands_tried"]][:2] == [0.0, 0.05]
    assert report["middle"]["report"]["variant"] == "ort-int8" and "a middle stage (int8" in p.stdout
    assert report["speedup"] > 0 and report["speedup_estimate"] > 0

    host = EngineHost(Settings(models_file=mf, builtin_models=False, home=tmp_path / "home", dedup_ttl_s=0))
    eng = host.engine("tiny-cascade")
    assert eng.variant == "cascade(ort-int8-student1of2-cpu>cascade(ort-int8-cpu>torch-float32-cpu))"
    assert eng.teacher.band == manifest["middle"]["band"] and eng.teacher.teacher.variant == "torch-float32-cpu"
    item = S.WorkItem(1, "c1", "/v1/moderations", "tiny-cascade", {"input": ["i will hurt you", "hello"]}, "0" * 64)
    (prep,) = host.prepare([item])
    for student_band, middle_band, stage in ((0.0, 0.0, "student"), (100.0, 0.0, "middle"), (100.0, 100.0, "full")):
        eng.band, eng.teacher.band = student_band, middle_band
        results = through_batcher(host, "tiny-cascade", prep.payloads)
        assert host.format(item, results)["provenance"]["decided_by"] == [stage, stage]
        assert results == eng.run(prep.payloads)
        counts = cascade_counts([(item, results)])
        assert counts == {"cascade_inputs": 2, "escalated": 0 if stage == "student" else 2,
                          "to_full": 2 if stage == "full" else 0}
    # the workers' stats name the three stages as provenance does
    from gristmill.workers.control import _describe
    stages = _describe(eng)["stages"]
    assert list(stages) == ["student", "middle", "full"] and stages["middle"]["variant"] == "ort-int8-cpu"
    assert stages["full"]["variant"] == "torch-float32-cpu"
    host.shutdown()


def test_fit_head_recovers_a_linear_map_and_weighs_the_boundary():
    from gristmill.kernels.distill import fit_head
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    w_true, b_true = torch.randn(3, 8, generator=g), torch.tensor([0.5, -1.0, 2.0])
    w, b = fit_head(x, x @ w_true.T + b_true, ridge=1e-6)
    assert torch.allclose(w, w_true, atol=1e-4) and torch.allclose(b, b_true, atol=1e-4)
    # a target no line fits: near the threshold (logit 0) the weighted fit is the closer one
    y = (x[:, :1] * 2).pow(3)
    plain = fit_head(x, y)
    near = fit_head(x, y, torch.zeros(1), boundary=50.0, boundary_tau=0.5)
    close = y[:, 0].abs() < 0.5
    err = [((x @ h[0].T + h[1]) - y)[close].abs().mean() for h in (plain, near)]
    assert err[1] < err[0]


def test_a_student_artifact_carries_its_own_head_and_engines_use_it_for_the_head_it_replaces(weights, tmp_path):
    from gristmill.kernels import heads
    from gristmill.kernels.onnx_engine import OnnxClassifierEngine
    from gristmill.kernels.optimize import STUDENT_HEAD_FILE, build_student, head_digest
    g = torch.Generator().manual_seed(1)
    registered = (torch.randn(3, 32, generator=g), torch.zeros(3))
    labels = ["x", "y", "z"]
    head_file = tmp_path / "registered.safetensors"
    heads.save_head(head_file, *registered, labels, {})
    texts = [f"message {i} about the fox and the dog" + " again" * (i % 5) for i in range(80)]
    out = tmp_path / "student"
    manifest = build_student(weights / "encoder", out, transfer=texts, fraction=0.5, steps=3, head=registered,
                             thresholds=[0.5, 0.4, 0.6], labels=labels, quantize=None, max_length=32)
    own = manifest["head"]
    assert own["replaces"] == head_digest(registered[0]) and own["check_texts"] == 16 and own["fit_texts"] == 64
    assert own["fit_on"] == "transfer texts"
    assert own["kept"] == (own["check_flags"]["own_head"] > own["check_flags"]["teacher_head"])
    assert (out / STUDENT_HEAD_FILE).exists() == own["kept"]
    # whatever this tiny run decided, an engine scores with the artifact's own head when there is one
    mine = (torch.randn(3, 32, generator=g), torch.tensor([0.1, 0.2, 0.3]))
    heads.save_head(out / STUDENT_HEAD_FILE, *mine, labels, {})
    path = out / "gristmill-artifact.json"
    path.write_text(json.dumps({**manifest, "head": {**own, "file": STUDENT_HEAD_FILE}}))
    engine = OnnxClassifierEngine(out, head=head_file)
    batch = engine.encode(["the fox", "a dog and a fox"])
    emb = engine.embed(batch)
    expect = torch.sigmoid(emb @ mine[0].T + mine[1])
    got = torch.tensor([[r[k] for k in labels] for r in engine.run(batch)])
    assert torch.allclose(got, expect, atol=1e-5)
    # ... but not when it was fit against another head than the one registered now
    path.write_text(json.dumps({**manifest, "head": {**own, "file": STUDENT_HEAD_FILE, "replaces": "0" * 12}}))
    engine = OnnxClassifierEngine(out, head=head_file)
    got = torch.tensor([[r[k] for k in labels] for r in engine.run(batch)])
    assert torch.allclose(got, torch.sigmoid(emb @ registered[0].T + registered[1]), atol=1e-5)


def test_a_student_fits_its_own_head_on_other_texts_where_given(weights, tmp_path):
    from gristmill.kernels import corpus
    from gristmill.kernels.optimize import build_student, student_digest
    registered = (torch.randn(3, 32, generator=torch.Generator().manual_seed(3)), torch.zeros(3))
    texts = [f"message {i} about the fox and the dog" + " again" * (i % 5) for i in range(80)]
    others = [f"a note {i} on cats" + " too" * (i % 3) for i in range(50)]
    kw = dict(transfer=texts, fraction=0.5, steps=2, head=registered, thresholds=[0.5, 0.4, 0.6], quantize=None,
              max_length=32)
    manifest = build_student(weights / "encoder", tmp_path / "student", **kw, head_texts=others)
    own = manifest["head"]
    assert own["fit_on"] == "other texts" and own["check_texts"] == 10 and own["fit_texts"] == 40
    digest = dict(src=weights / "encoder", transfer=texts, fraction=0.5, steps=2, quantize=None, max_length=32,
                  head=registered, thresholds=[0.5, 0.4, 0.6])
    assert manifest["digest"] == student_digest(**digest, head_texts=others) != student_digest(**digest)
    # the built-in set's second draw: the same every time, another draw than the distillation's, nothing held out
    draw = corpus.builtin_head_texts(weights / "encoder", 300)
    assert draw == corpus.builtin_head_texts(weights / "encoder", 300) and len(draw) == 300
    assert draw != corpus.builtin_transfer_set(300, weights / "encoder")
    assert not set(corpus.heldout_set(200)) & set(draw)
    # where a file of traffic was mixed into the transfer set, its lines follow the draw, once each
    assert corpus.builtin_head_texts(weights / "encoder", 300, traffic=["mine", "yours"]) == [*draw, "mine", "yours"]


def test_distilling_on_a_named_device_leaves_both_models_where_they_were(weights):
    """`device` moves the training, not the models: the student comes back trained, on the CPU
    where it started, as it would from a GPU, and the same as without `device`."""
    from gristmill.kernels.distill import model_device
    texts = [f"text number {i}" + " with some words" * (i % 4) for i in range(40)]
    trained = []
    for device in (None, "cpu"):
        teacher, student, tok = _tiny_student(weights)
        report = distill_student(teacher, student, tok, texts, steps=3, max_length=16, batch=8, device=device,
                                 keep_layers=StudentShape.for_fraction(0.5, 2).keep_layers)
        assert model_device(student).type == model_device(teacher).type == "cpu" and not student.training
        assert report.teacher_pooled.device.type == "cpu"
        trained.append(student.encoder.layer[0].output.dense.weight.detach().clone())
    assert torch.equal(trained[0], trained[1])


def test_the_training_device_is_chosen_checked_and_named(weights):
    from gristmill.kernels.loading import training_bf16, training_device
    from gristmill.kernels.optimize import trained_student_digest
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert training_device("cpu").type == "cpu" and isinstance(training_bf16(torch.device("cpu")), bool)
    with pytest.raises(ValueError, match="must be one of auto, cpu, cuda"):
        training_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            training_device("cuda")
    # a student trained on a GPU is another student; those trained on the CPU keep their names
    kw = dict(transfer=["a", "b"], fraction=0.5, steps=2, head=None, max_length=32, thresholds=None, bf16=False)
    on_cpu = trained_student_digest(weights / "encoder", **kw)
    assert trained_student_digest(weights / "encoder", device="cpu", **kw) == on_cpu
    assert trained_student_digest(weights / "encoder", device="cuda", **kw) != on_cpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_optimize_refuses_to_train_on_a_gpu_it_does_not_have_or_without_a_student(tiny_models_file, tmp_path):
    import os
    import subprocess
    from tests.commands import GRISTMILL, ROOT as root
    env = {**os.environ, "GRISTMILL_MODELS_FILE": str(tiny_models_file), "GRISTMILL_BUILTIN_MODELS": "false",
           "GRISTMILL_HOME": str(tmp_path / "home")}
    p = subprocess.run([*GRISTMILL, "optimize", "tiny-moderation", "--out", str(tmp_path / "art"), "--prune", "0.5",
                        "--distill", "builtin", "--train-device", "cuda"], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "--train-device cuda: device 'cuda' requested but CUDA is not available" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "art").exists()
    alone = subprocess.run([*GRISTMILL, "optimize", "tiny-moderation", "--out", str(tmp_path / "art"),
                            "--train-device", "cpu"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert alone.returncode != 0 and "use it with --distill" in alone.stderr and "Traceback" not in alone.stderr
    # the benchmarks that train a student say it the same way, before any work
    for bench, flag in (("benchmarks.engine_variants", "--train-device"), ("benchmarks.student_ablation", "--device")):
        p = subprocess.run([sys.executable, "-m", bench, flag, "cuda"], env=env, cwd=root, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and f"{flag} cuda: device 'cuda' requested" in p.stderr and "Traceback" not in p.stderr


def test_a_head_refit_reuses_the_teachers_embeddings_from_training(weights):
    from gristmill.kernels.distill import refit_head, teacher_targets
    teacher, student, tok = _tiny_student(weights)
    texts = [f"message {i} about the fox" + " again" * (i % 4) for i in range(60)]
    head = (torch.randn(3, 32, generator=torch.Generator().manual_seed(2)), torch.zeros(3))
    report = distill_student(teacher, student, tok, texts, steps=2, max_length=16, batch=8)
    assert torch.allclose(report.teacher_pooled, teacher_targets(teacher, tok, texts, 16), atol=1e-5)
    kw = dict(max_length=16, head=head, thresholds=[0.5, 0.4, 0.6])
    again, reused = (refit_head(teacher, student, tok, texts, **kw, teacher_pooled=p)
                     for p in (None, report.teacher_pooled))
    assert again.summary() == reused.summary()
    assert torch.allclose(again.weight, reused.weight, atol=1e-4)


def test_a_distilled_student_is_kept_and_reused_by_another_quantization(weights, tmp_path):
    from gristmill.kernels.optimize import build_student, trained_student_digest
    texts = [f"message {i} about the fox and the dog" + " again" * (i % 5) for i in range(40)]
    kw = dict(transfer=texts, fraction=0.5, steps=2, head=None, max_length=32)
    cache = tmp_path / "students"
    logs: list[list[str]] = [[], []]
    fp32 = build_student(weights / "encoder", tmp_path / "fp32", quantize=None, trained_cache=cache,
                         log=logs[0].append, **kw)
    int8 = build_student(weights / "encoder", tmp_path / "int8", quantize="int8", trained_cache=cache,
                         log=logs[1].append, **kw)
    digest = trained_student_digest(weights / "encoder", thresholds=None, bf16=False, **kw)
    assert fp32["student"]["trained"] == int8["student"]["trained"] == digest
    assert [p.name for p in cache.iterdir()] == [digest]
    assert not any("reused" in m for m in logs[0]) and any("reused" in m for m in logs[1])
    assert int8["student"]["losses"] == fp32["student"]["losses"] and int8["quantize"] == "int8"
    # the same weights: the fp32 artifact of the reused student scores as the first one did
    again = build_student(weights / "encoder", tmp_path / "again", quantize=None, trained_cache=cache, **kw)
    from gristmill.kernels.onnx_engine import OnnxClassifierEngine
    from gristmill.producers.registry import DEFAULT_PROTOTYPES
    a, b = (OnnxClassifierEngine(d, max_length=32, prototypes=DEFAULT_PROTOTYPES, neutral=["ok"])
            for d in (tmp_path / "fp32", tmp_path / "again"))
    assert again["student"]["trained"] == digest
    assert torch.allclose(a.embed(a.encode(texts[:4])), b.embed(b.encode(texts[:4])), atol=1e-5)
    # what trains it names it; steps do, quantization does not (it is not an argument)
    assert trained_student_digest(weights / "encoder", thresholds=None, bf16=False, **{**kw, "steps": 3}) != digest


def test_escalation_rules_are_chosen_on_the_pick_half_and_judged_on_the_check_half():
    """benchmarks.escalation_rules: the least cut meeting the floors on the even-indexed texts, and
    per-label bands narrowed where a label's errors allow it."""
    import numpy as np

    from benchmarks.escalation_rules import Judge, per_label_bands
    n = 400
    threshold = np.zeros(2)
    full = np.column_stack([np.linspace(-2, 2, n), np.full(n, -3.0)])
    student = full.copy()
    student[::7, 0] = -full[::7, 0] * 0.1  # label 0: every seventh text's flag flips, near its threshold
    judge = Judge(student, full, threshold)
    flips = judge.wrong.any(1)
    assert flips[judge.pick].any() and flips[judge.check].any()
    margin = np.abs(student - threshold)
    escalate, cut = judge.least_cut(margin)
    # the floors (0 of 400 flags, 1 of 200 texts) leave no flip on the pick half: the least cut is
    # the pick half's next margin above its widest flip's
    lowest = margin.min(1)[judge.pick]
    widest_flip = lowest[flips[judge.pick]].max()
    assert cut == lowest[lowest > widest_flip].min() and not (flips & ~escalate)[judge.pick].any()
    assert not judge.meets(judge.pick, np.zeros(n, dtype=bool))
    # the check half is judged with the same cut, not one fitted to it
    checked = judge.result(escalate)
    assert checked.escalated == pytest.approx(escalate[judge.check].mean(), abs=1e-4)
    assert checked.texts_identical == pytest.approx(1 - (flips & ~escalate)[judge.check].mean(), abs=1e-4)
    # label 1 is never near its threshold: per-label bands meet the floors escalating no more
    per_label = per_label_bands(judge, margin, cut)
    assert judge.meets(judge.pick, per_label) and per_label.sum() <= escalate.sum()
    none = judge.result(np.zeros(n, dtype=bool))
    assert none.escalated == 0.0 and not none.floors_met


def test_escalation_rules_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "benchmarks.escalation_rules", str(tmp_path)], cwd=root,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "not an artifact directory" in run.stderr


def test_status_splits_a_three_stage_cascades_escalated_inputs_between_its_later_stages():
    from gristmill.producers.batches import Batch, CascadeCounts, ChunkCounts, RequestCounts
    from gristmill.producers.cli import _details

    def details(escalated: int, to_full: int) -> str:
        return _details(Batch(id="batch_x", status="completed", created_at=0, request_counts=RequestCounts(total=200),
                              cascade=CascadeCounts(inputs=200, escalated=escalated, to_full=to_full)))
    three = details(42, 12)
    assert "42 of 200 classifier inputs escalated past the student (21.0%)" in three
    assert "a middle stage decided 30 of those, the full model 12 (6.0% of all)" in three
    assert "middle stage" not in details(42, 42)
    # chunk counts add up field by field, the full model's share with them
    total = ChunkCounts(cascade_inputs=2, escalated=1, to_full=1) + ChunkCounts(cascade_inputs=3, escalated=2)
    assert (total.cascade_inputs, total.escalated, total.to_full) == (5, 3, 1)
