"""A physically smaller student of a sentence encoder, trained to give the teacher's scores.

The student keeps an evenly spaced subset of the teacher's layers, the first and last among them
(as DistilBERT initialises from every other layer), so it starts near the teacher and the layers it
keeps are whole: a 3-layer student of a 6-layer encoder runs in about half the time, and the ONNX
export and int8 quantization treat it as any BERT. Training matches, on unlabelled text, the
teacher's pooled, normalised embedding (1 - cosine) and, when the classifier's linear head is
given, the head's logits (mean squared error): the head is what turns embeddings into decisions,
so its logits near a threshold are what the student must get right. Teacher targets are computed
once, in fp32, and with them the token states of the teacher layers the student's layers match
(kept in fp16 where they fit STATE_CACHE_BYTES), so a training step runs the student alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from .prune import _layers, _pooled

# Texts whose teacher logit for some label lies within this of its threshold's logit (where a
# student's error flips a decision) are drawn FOCUS_WEIGHT times as often. On the default
# moderation head this is nearly every text: half the transfer set lies within 0.72 logit of some
# label's threshold (benchmarks/README.md).
FOCUS_BAND, FOCUS_WEIGHT = 2.0, 4


@dataclass(frozen=True)
class DistillLoss:
    """The weights of the student's loss terms, beside the pooled embedding's (1 - cosine), 1."""
    logit: float = 1.0  # a head logit's squared error, per label
    layer: float = 1.0  # per kept layer: mean squared error of its token states against the teacher layer's
    # > 0: a (text, label) logit's squared error weighs 1 + boundary * exp(-|teacher logit -
    # threshold logit| / boundary_tau), more where an error flips a decision (the default recipe
    # leaves it off: on the default head it changed the student's agreement by less than noise)
    boundary: float = 0.0
    boundary_tau: float = 0.5
    # > 0: per kept layer, the KL divergence of its attention distributions from its teacher layer's
    # (as MiniLM's own distillation matches self-attention); needs a teacher forward every step
    attention: float = 0.0
    # > 0: the tail of the logit errors near a decision. Per (text, label) whose teacher logit lies
    # within TAIL_BAND of the threshold's, the squared part of its error beyond `tail_margin`
    # (averaged over those pairs): a cascade's band must cover the student's largest errors there,
    # not its typical ones
    tail: float = 0.0
    tail_margin: float = 0.05


TAIL_BAND = 0.5


@dataclass(frozen=True)
class StudentShape:
    """Which of the teacher's layers the student keeps."""
    keep_layers: tuple[int, ...]
    teacher_layers: int

    @classmethod
    def for_fraction(cls, fraction: float, teacher_layers: int) -> "StudentShape":
        """Remove `fraction` of the layers (at least one stays), evenly spaced, first and last kept."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
        k = max(1, round(teacher_layers * (1 - fraction)))
        if k == 1:
            return cls((teacher_layers - 1,), teacher_layers)
        keep = sorted({round(i * (teacher_layers - 1) / (k - 1)) for i in range(k)})
        return cls(tuple(keep), teacher_layers)


def make_student(teacher: nn.Module, shape: StudentShape) -> nn.Module:
    """A copy of `teacher` with only `shape.keep_layers` (a BERT-style encoder)."""
    student = copy.deepcopy(teacher)
    layers = _layers(student)
    if len(layers) != shape.teacher_layers:
        raise ValueError(f"the teacher has {len(layers)} layers, the shape expects {shape.teacher_layers}")
    encoder = getattr(student, "encoder", None) or student.bert.encoder
    encoder.layer = nn.ModuleList([layers[i] for i in shape.keep_layers])
    student.config.num_hidden_layers = len(shape.keep_layers)
    return student


@dataclass
class DistillReport:
    texts: int
    steps: int
    seconds: float
    losses: list[float]
    teacher_layers: int
    student_layers: int
    teacher_pooled: torch.Tensor | None = None  # the teacher's pooled embedding of each text, in input order


def _encode(tokenizer, texts: list[str], max_length: int, device: torch.device | str = "cpu"):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights are: its forwards take their inputs there."""
    return next(model.parameters()).device


@torch.no_grad()
def teacher_targets(teacher: nn.Module, tokenizer, texts: list[str], max_length: int,
                    batch: int = 128) -> torch.Tensor:
    """The teacher's pooled, normalised fp32 embedding of every text, [n, hidden], on the CPU
    (the forwards run where the model's weights are)."""
    return _teacher_pass(teacher, tokenizer, texts, max_length, batch=batch).pooled


# The most memory the teacher's token states of the kept layers may take (fp16) to be computed
# once, in the pass that gives the pooled targets, instead of by a teacher forward in every step
# (half a step's time). Above it (a transfer set of ~200,000 texts for a 3-layer student of a
# 384-wide encoder), every step runs the teacher as before.
STATE_CACHE_BYTES = 6 << 30


@dataclass
class TeacherPass:
    pooled: torch.Tensor  # [n, hidden], fp32
    states: list[torch.Tensor] | None  # per text, [its tokens, kept layers, hidden], fp16; None: not kept


@torch.no_grad()
def _teacher_pass(teacher: nn.Module, tokenizer, texts: list[str], max_length: int, *,
                  layers: tuple[int, ...] = (), batch: int = 128, cache_bytes: int = 0) -> TeacherPass:
    """One fp32 teacher forward over `texts`: their pooled embeddings and, where `layers` are
    given and their token states fit in `cache_bytes`, those states (hidden_states[i + 1] per i).
    The forwards run on the teacher's device; what they give is kept on the CPU."""
    teacher.eval()
    device = model_device(teacher)
    batches = [_encode(tokenizer, texts[s: s + batch], max_length) for s in range(0, len(texts), batch)]
    tokens = sum(int(mask.sum()) for _, mask in batches)
    keep = bool(layers) and tokens * len(layers) * teacher.config.hidden_size * 2 <= cache_bytes
    pooled, states = [], []
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=keep)
        pooled.append(_pooled(out.last_hidden_state.float(), mask).cpu())
        if keep:
            stacked = torch.stack([out.hidden_states[i + 1] for i in layers], 2).half().cpu()  # [b, len, k, hidden]
            states += [stacked[j, : int(n)].clone() for j, n in enumerate(mask.sum(1).tolist())]
    return TeacherPass(torch.cat(pooled), states if keep else None)


def states_on(states: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Per-text teacher states copied to `device` in one transfer, as views of one tensor there."""
    return list(torch.cat(states).to(device).split([len(st) for st in states]))


def _padded(states: list[torch.Tensor], length: int) -> torch.Tensor:
    """Per-text [tokens, k, hidden] states as one fp32 [b, length, k, hidden], zeros past each text."""
    out = torch.zeros(len(states), length, *states[0].shape[1:], device=states[0].device)
    for j, st in enumerate(states):
        out[j, : st.shape[0]] = st.float()
    return out


def threshold_logits(thresholds: list[float]) -> torch.Tensor:
    """Per-label score thresholds as logits, where the head's outputs are compared with them."""
    t = torch.tensor(thresholds).clamp(1e-6, 1 - 1e-6)
    return torch.log(t / (1 - t))


def distill_student(teacher: nn.Module, student: nn.Module, tokenizer, texts: list[str], *, steps: int,
                    max_length: int, head: tuple[torch.Tensor, torch.Tensor] | None = None,
                    thresholds: list[float] | None = None, batch: int = 64, lr: float = 3e-4, seed: int = 0,
                    bf16: bool = False, keep_layers: tuple[int, ...] | None = None,
                    loss_weights: DistillLoss = DistillLoss(), state_cache_bytes: int | None = None,
                    device: str | torch.device | None = None, on_step=None, log=None) -> DistillReport:
    """Train `student` in place toward `teacher` on `texts` for `steps` batches (length-bucketed,
    so little padding), AdamW with a cosine schedule. With the head and its per-label `thresholds`,
    texts near a decision are drawn more often (FOCUS_*). `bf16`: autocast the student's matmuls (on
    CPUs with native bf16; its weights and the targets stay fp32). `state_cache_bytes` (default
    STATE_CACHE_BYTES; 0: a teacher forward every step) bounds the teacher states kept. `device`
    (default: the student's): where the teacher's pass and the training run ("cuda": a GPU, where a
    step takes milliseconds, `bf16` there autocasting on it; the cached states are copied there once,
    so STATE_CACHE_BYTES is then GPU memory); both models are back where they were when it returns,
    and the report's tensors are on the CPU. `on_step(step)`, called
    after each step (counted from 1), may look at the student (on `device`); it returns True to stop
    training there (the schedule stays the one for `steps`)."""
    device = torch.device(device) if device is not None else model_device(student)
    try:
        with on_device(device, teacher, student):
            return _distill(teacher, student, tokenizer, texts, steps=steps, max_length=max_length, head=head,
                            thresholds=thresholds, batch=batch, lr=lr, seed=seed, bf16=bf16, keep_layers=keep_layers,
                            loss_weights=loss_weights, state_cache_bytes=state_cache_bytes, device=device,
                            on_step=on_step, log=log)
    finally:
        student.eval()


@contextlib.contextmanager
def on_device(device: str | torch.device, *models: nn.Module):
    """The models moved to `device` for the block, and back where each was after it."""
    homes = [model_device(m) for m in models]
    try:
        for m in models:
            m.to(device)
        yield
    finally:
        for m, home in zip(models, homes):
            m.to(home)


def _distill(teacher: nn.Module, student: nn.Module, tokenizer, texts: list[str], *, steps: int, max_length: int,
             head, thresholds, batch: int, lr: float, seed: int, bf16: bool, keep_layers, loss_weights: DistillLoss,
             state_cache_bytes: int | None, device: torch.device, on_step, log) -> DistillReport:
    t0 = time.perf_counter()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    sorted_texts = [texts[i] for i in order]
    cap = STATE_CACHE_BYTES if state_cache_bytes is None else state_cache_bytes
    teacher_pass = _teacher_pass(teacher, tokenizer, sorted_texts, max_length, layers=keep_layers or (),
                                 cache_bytes=cap if loss_weights.layer else 0)
    targets = teacher_pass.pooled.to(device)
    states = teacher_pass.states
    if states is not None and device.type != "cpu":  # on the GPU with the student: one copy, not one a step
        states = states_on(states, device)
    buckets = [range(s, min(s + batch, len(texts))) for s in range(0, len(texts), batch)]
    w, b = (head[0].to(device), head[1].to(device)) if head is not None else (None, None)
    z_threshold = None
    if w is not None and thresholds is not None:
        z_threshold = threshold_logits(thresholds).to(device)
        gap = ((targets @ w.T + b) - z_threshold).abs().min(1).values.cpu()
        near = [i for i in range(len(texts)) if gap[i] < FOCUS_BAND]
        for s in range(0, len(near), batch):  # the near texts again, in buckets of their own
            buckets += [near[s: s + batch]] * (FOCUS_WEIGHT - 1)
        if log is not None:
            log(f"distill: {len(near)} of {len(texts)} transfer texts lie near a decision; drawn {FOCUS_WEIGHT}x")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    student.train()
    losses: list[float] = []
    running = 0.0
    done = 0
    for step in range(steps):
        idx = list(rng.choice(buckets))
        ids, mask = _encode(tokenizer, [sorted_texts[i] for i in idx], max_length, device)
        t = targets[idx]
        attend = keep_layers is not None and loss_weights.attention > 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = student(input_ids=ids, attention_mask=mask, output_hidden_states=keep_layers is not None,
                          output_attentions=attend)
        e = _pooled(out.last_hidden_state.float(), mask)
        loss = (1 - (e * t).sum(-1)).mean()
        match_states = keep_layers is not None and bool(loss_weights.layer)
        fresh_states = match_states and states is None
        if fresh_states or attend:  # one teacher forward gives whatever this step needs that was not cached
            with torch.no_grad():
                teacher_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=fresh_states,
                                      output_attentions=attend)
        if match_states:  # each kept layer's token states toward its teacher layer's
            if fresh_states:
                th = [teacher_out.hidden_states[i + 1] for i in keep_layers]
            else:
                th = _padded([states[i] for i in idx], ids.shape[1]).unbind(2)  # where the states are: `device`
            m = mask.unsqueeze(-1).float()
            for j, t_layer in enumerate(th):
                d = out.hidden_states[j + 1].float() - t_layer
                loss = loss + loss_weights.layer * (d.pow(2) * m).sum() / (m.sum() * d.shape[-1])
        if attend:
            loss = loss + loss_weights.attention * _attention_kl(
                [teacher_out.attentions[i] for i in keep_layers], out.attentions, mask)
        if w is not None:
            z_teacher = t @ w.T + b
            weight = 1.0 if z_threshold is None or not loss_weights.boundary else (
                1 + loss_weights.boundary * torch.exp(-(z_teacher - z_threshold).abs() / loss_weights.boundary_tau))
            err = (e @ w.T + b) - z_teacher
            loss = loss + loss_weights.logit * (weight * err.pow(2)).mean()
            if loss_weights.tail and z_threshold is not None:
                near = ((z_teacher - z_threshold).abs() < TAIL_BAND).float()
                beyond = (err.abs() - loss_weights.tail_margin).clamp_min(0).pow(2)
                loss = loss + loss_weights.tail * (beyond * near).sum() / near.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        running = running + loss.detach()  # read every 100 steps: a GPU need not wait on each
        if (step + 1) % 100 == 0 or step == steps - 1:
            losses.append(round(float(running) / ((step % 100) + 1), 6))
            running = 0.0
            if log is not None:
                log(f"distill step {step + 1}/{steps}: loss {losses[-1]:.5f} ({time.perf_counter() - t0:.0f} s)")
        done = step + 1
        if on_step is not None and on_step(done):
            break
    pooled = torch.empty_like(teacher_pass.pooled)
    pooled[order] = teacher_pass.pooled
    return DistillReport(len(texts), done, round(time.perf_counter() - t0, 1), losses,
                         len(_layers(teacher)), len(_layers(student)), pooled)


def _attention_kl(teacher_attentions, student_attentions, mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers, heads and real query tokens of KL(teacher || student) between matched
    layers' attention distributions ([b, heads, query, key] each)."""
    rows = mask[:, None, :, None].float()  # [b, 1, query, 1]
    total = 0.0
    for t, s in zip(teacher_attentions, student_attentions, strict=True):
        t, s = t.float(), s.float()
        kl = (t * (t.clamp_min(1e-9).log() - s.clamp_min(1e-9).log())).sum(-1, keepdim=True)
        total = total + (kl * rows).sum() / (rows.sum() * t.shape[1])
    return total / len(teacher_attentions)


def fit_head(embeddings: torch.Tensor, teacher_logits: torch.Tensor, z_threshold: torch.Tensor | None = None, *,
             ridge: float = 1e-2, boundary: float = 8.0, boundary_tau: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head of the student's own: per label, the weighted ridge regression (closed form, in
    fp64) from the student's pooled embeddings [n, hidden] to the teacher's logits [n, labels]
    through the teacher's head. With `z_threshold`, a (text, label) weighs 1 + boundary *
    exp(-|teacher logit - threshold logit| / boundary_tau), so the fit is best where an error flips
    a decision. Returns (weight [labels, hidden], bias [labels])."""
    x = torch.cat([embeddings.double(), torch.ones(len(embeddings), 1, dtype=torch.float64)], 1)
    y = teacher_logits.double()
    weight = (torch.ones_like(y) if z_threshold is None
              else 1 + boundary * torch.exp(-(y - z_threshold.double()).abs() / boundary_tau))
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    eye[-1, -1] = 0.0  # the bias is not shrunk
    cols = [torch.linalg.solve(x.T @ (x * weight[:, k: k + 1]) + ridge * eye, x.T @ (y[:, k] * weight[:, k]))
            for k in range(y.shape[1])]
    solved = torch.stack(cols, 1)  # [hidden + 1, labels]
    return solved[:-1].T.float().contiguous(), solved[-1].float().contiguous()


# A student's own head is fit on up to HEAD_FIT_TEXTS texts (its transfer texts, or others given)
# and kept where it agrees with the teacher's flags better than the teacher's head on
# HEAD_CHECK_TEXTS others.
HEAD_FIT_TEXTS, HEAD_CHECK_TEXTS = 20_000, 5_000


@dataclass
class HeadRefit:
    weight: torch.Tensor
    bias: torch.Tensor
    fit_texts: int
    check_texts: int
    flags_teacher_head: float  # flag agreement with the teacher on the check texts, through the teacher's head
    flags_refit: float  # ... and through the refit head

    @property
    def kept(self) -> bool:
        return self.flags_refit > self.flags_teacher_head

    def summary(self) -> dict:
        return {"kept": self.kept, "fit_texts": self.fit_texts, "check_texts": self.check_texts,
                "check_flags": {"teacher_head": self.flags_teacher_head, "own_head": self.flags_refit}}


def refit_head(teacher: nn.Module, student: nn.Module, tokenizer, texts: list[str], *, max_length: int,
               head: tuple[torch.Tensor, torch.Tensor], thresholds: list[float], seed: int = 0,
               teacher_pooled: torch.Tensor | None = None) -> HeadRefit:
    """Fit the student a head of its own (`fit_head`, weighted near the `thresholds`) on some of
    `texts` and check it on others: the teacher's head reads the teacher's embedding space, which
    the student only approximates, and a linear map from the student's own embeddings to the
    teacher's logits takes out the part of its error that is linear. `teacher_pooled`: the teacher's
    pooled embeddings of `texts` where already computed (`DistillReport.teacher_pooled`)."""
    if len(texts) < 10:
        raise ValueError(f"a head refit needs at least 10 texts, got {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_check = min(HEAD_CHECK_TEXTS, len(texts) // 5)
    check_idx, fit_idx = order[:n_check], order[n_check: n_check + HEAD_FIT_TEXTS]
    check, fit = [texts[i] for i in check_idx], [texts[i] for i in fit_idx]
    w, b = head
    z_threshold = threshold_logits(thresholds)

    def teacher_logits(idx: list[int], some: list[str]) -> torch.Tensor:
        pooled = teacher_pooled[idx] if teacher_pooled is not None else teacher_targets(teacher, tokenizer, some,
                                                                                        max_length)
        return pooled @ w.T + b
    z_fit = teacher_logits(fit_idx, fit)
    new_w, new_b = fit_head(teacher_targets(student, tokenizer, fit, max_length), z_fit, z_threshold)
    z_check = teacher_logits(check_idx, check)
    e_check = teacher_targets(student, tokenizer, check, max_length)

    def flags(hw: torch.Tensor, hb: torch.Tensor) -> float:
        return ((e_check @ hw.T + hb >= z_threshold) == (z_check >= z_threshold)).float().mean().item()
    return HeadRefit(new_w, new_b, len(fit), len(check), round(flags(w, b), 5), round(flags(new_w, new_b), 5))
