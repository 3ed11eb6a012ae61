"""Structured pruning of BERT-style encoders: attention heads and FFN neurons, removed physically.

Importance is measured on calibration text, as in Michel et al. (2019) and the movement/magnitude
pruning literature, with a cheap proxy that needs no gradients: a head's (or neuron's) mean output
magnitude on real tokens times the norm of the weights that carry it into the residual stream.
The same number of heads and the same fraction of neurons go from every layer, so the shapes stay
uniform (ONNX Runtime's attention fusion wants one head count) and the speed-up is predictable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PruneReport:
    heads_before: int
    heads_after: int
    ffn_before: int
    ffn_after: int
    params_before: int
    params_after: int


def _layers(model: nn.Module) -> list[nn.Module]:
    enc = getattr(model, "encoder", None) or getattr(getattr(model, "bert", None), "encoder", None)
    if enc is None or not hasattr(enc, "layer"):
        raise ValueError(f"{type(model).__name__}: structured pruning supports BERT-style encoders only")
    return list(enc.layer)


def calibration_batches(tokenizer, texts: list[str], max_length: int,
                        batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`texts` as padded (input_ids, attention_mask) batches of `batch`, what importance, prune and
    distill take."""
    enc = [tokenizer(texts[i: i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
           for i in range(0, len(texts), batch)]
    return [(e["input_ids"], e["attention_mask"]) for e in enc]


def _slice_linear(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) `keep`."""
    w = layer.weight.detach().index_select(dim, keep).clone()
    b = layer.bias.detach().clone() if layer.bias is not None else None
    if dim == 0 and b is not None:
        b = b.index_select(0, keep).clone()
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    out.weight.data.copy_(w)
    if b is not None:
        out.bias.data.copy_(b)
    return out


@torch.inference_mode()
def importance(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-layer head scores [heads], per-layer FFN neuron scores [intermediate]) on calibration
    batches of (input_ids, attention_mask)."""
    layers = _layers(model)
    head_sum = [None] * len(layers)
    ffn_sum = [None] * len(layers)
    state: dict[str, torch.Tensor] = {}
    hooks = []

    def ctx_hook(i):
        def f(mod, args):
            x = args[0].float()  # [B, S, heads*d], the attention context before the output projection
            m = state["mask"]
            att = layers[i].attention.self
            d = att.attention_head_size
            per_head = x.view(*x.shape[:2], -1, d).norm(dim=-1)  # [B, S, heads]
            s = (per_head * m[..., None]).sum((0, 1))
            head_sum[i] = s if head_sum[i] is None else head_sum[i] + s
        return f

    def ffn_hook(i):
        def f(mod, args):
            x = args[0].float().abs()  # [B, S, intermediate], after the activation
            s = (x * state["mask"][..., None]).sum((0, 1))
            ffn_sum[i] = s if ffn_sum[i] is None else ffn_sum[i] + s
        return f

    for i, layer in enumerate(layers):
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(ctx_hook(i)))
        hooks.append(layer.output.dense.register_forward_pre_hook(ffn_hook(i)))
    try:
        for ids, mask in batches:
            state["mask"] = mask.float()
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    heads, ffn = [], []
    for i, layer in enumerate(layers):
        att = layer.attention.self
        d = att.attention_head_size
        w_o = layer.attention.output.dense.weight.float()  # [hidden, heads*d]
        w_norm = w_o.view(w_o.shape[0], -1, d).norm(dim=(0, 2))
        heads.append(head_sum[i] * w_norm)
        ffn.append(ffn_sum[i] * layer.output.dense.weight.float().norm(dim=0))
    return heads, ffn


def prune(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], fraction: float,
          head_fraction: float | None = None) -> PruneReport:
    """Remove `fraction` of every layer's FFN neurons and `head_fraction` (default fraction / 2:
    heads carry more of the accuracy per parameter) of its heads, lowest importance first. In place."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    head_fraction = fraction / 2 if head_fraction is None else head_fraction
    params_before = sum(p.numel() for p in model.parameters())
    layers = _layers(model)
    heads_before = sum(layer.attention.self.num_attention_heads for layer in layers)
    ffn_before = sum(layer.intermediate.dense.out_features for layer in layers)
    head_scores, ffn_scores = importance(model, batches)
    for layer, hs, fs in zip(layers, head_scores, ffn_scores):
        att = layer.attention.self
        n_heads, d = att.num_attention_heads, att.attention_head_size
        drop = min(n_heads - 1, int(round(n_heads * head_fraction)))
        if drop:
            keep_heads = torch.sort(torch.topk(hs, n_heads - drop).indices).values
            keep = (keep_heads[:, None] * d + torch.arange(d)).reshape(-1).to(att.query.weight.device)
            att.query = _slice_linear(att.query, keep, 0)
            att.key = _slice_linear(att.key, keep, 0)
            att.value = _slice_linear(att.value, keep, 0)
            layer.attention.output.dense = _slice_linear(layer.attention.output.dense, keep, 1)
            att.num_attention_heads = n_heads - drop
            att.all_head_size = att.num_attention_heads * d
        n_ffn = layer.intermediate.dense.out_features
        keep_n = max(1, int(round(n_ffn * (1 - fraction))))
        if keep_n < n_ffn:
            keep = torch.sort(torch.topk(fs, keep_n).indices).values.to(layer.intermediate.dense.weight.device)
            layer.intermediate.dense = _slice_linear(layer.intermediate.dense, keep, 0)
            layer.output.dense = _slice_linear(layer.output.dense, keep, 1)
    return PruneReport(heads_before, sum(layer.attention.self.num_attention_heads for layer in layers),
                       ffn_before, sum(layer.intermediate.dense.out_features for layer in layers),
                       params_before, sum(p.numel() for p in model.parameters()))


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def distill(student: nn.Module, teacher: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
            steps: int, lr: float = 5e-5, seed: int = 0) -> list[float]:
    """Recover a pruned model by matching the unpruned one on the calibration batches: token hidden
    states (MSE on real tokens) plus the mean-pooled sentence direction (1 - cosine) for encoders,
    KL on the label distribution for classifiers. Returns the loss every 50 steps."""
    if steps <= 0 or not batches:
        return []
    g = torch.Generator().manual_seed(seed)
    teacher.eval()
    with torch.inference_mode():
        targets = [teacher(input_ids=i, attention_mask=m) for i, m in batches]
        targets = [(t.logits.clone() if hasattr(t, "logits") else t.last_hidden_state.clone()) for t in targets]
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        k = int(torch.randint(len(batches), (1,), generator=g))
        ids, mask = batches[k]
        out = student(input_ids=ids, attention_mask=mask)
        if hasattr(out, "logits"):
            loss = torch.nn.functional.kl_div(out.logits.log_softmax(-1), targets[k].softmax(-1), reduction="batchmean")
        else:
            h, t = out.last_hidden_state, targets[k]
            m = mask.unsqueeze(-1).to(h.dtype)
            mse = ((h - t) ** 2 * m).sum() / (m.sum() * h.shape[-1])
            cos = 1 - (_pooled(h, mask) * _pooled(t, mask)).sum(-1).mean()
            loss = mse + 10.0 * cos
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(float(loss), 5))
    student.eval()
    return losses
