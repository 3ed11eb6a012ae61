"""Review export: the classifier results whose score for some label falls inside a band, as CSV
for human review (`gristmill review ID --band 0.3:0.7 -o review.csv`).

Output lines do not repeat their inputs (OpenAI's shape), so the texts come from the batch's input
file, read again in line order after checking that its SHA-256 is still the one submitted.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import GristmillError

COLUMNS = ["custom_id", "input_index", "label", "score", "flagged", "policy_version", "input_sha256", "text"]


class ReviewError(GristmillError):
    """Raised when a review export cannot be made as asked (bad band, changed input file)."""


def parse_band(value: str) -> tuple[float, float]:
    """'LOW:HIGH' with 0 <= LOW <= HIGH <= 1."""
    try:
        lo_s, hi_s = value.split(":")
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise ReviewError(f"--band {value!r}: write LOW:HIGH, e.g. 0.3:0.7") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ReviewError(f"--band {value!r}: need 0 <= LOW <= HIGH <= 1")
    return lo, hi


def _scored(body: dict[str, Any]) -> Iterator[tuple[int, dict[str, float], set[str], str]]:
    """(input index, scores, flagged labels, policy version) of a moderation or classification body."""
    for i, r in enumerate(body.get("results", [])):
        if "category_scores" in r:
            yield i, r["category_scores"], {k for k, v in r["categories"].items() if v}, r.get("policy_version", "")
        elif "scores" in r:
            yield i, r["scores"], set(r.get("flagged_labels", [])), r.get("policy_version", "")


def band_rows(output_lines: Iterable[str], lo: float, hi: float) -> dict[str, list[dict[str, Any]]]:
    """custom_id -> review rows (every label whose score lies in [lo, hi]) from output JSONL lines.
    Generation lines and lines without results are skipped."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for raw in output_lines:
        if not raw.strip():
            continue
        line = json.loads(raw)
        body = (line.get("response") or {}).get("body") or {}
        shas = (line.get("provenance") or {}).get("input_sha256")
        for i, scores, flagged, version in _scored(body):
            for label, score in scores.items():
                if lo <= score <= hi:
                    sha = shas[i] if isinstance(shas, list) else shas
                    rows.setdefault(line["custom_id"], []).append(
                        {"custom_id": line["custom_id"], "input_index": i, "label": label, "score": round(score, 6),
                         "flagged": label in flagged, "policy_version": version, "input_sha256": sha or "", "text": ""})
    return rows


def _texts(body: Any) -> list[str]:
    value = body.get("input") if isinstance(body, dict) else None
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def write_review(client, batch_id: str, band: str, out: Path, input_file: Path | None = None,
                 text_chars: int = 500) -> tuple[int, bool]:
    """Write the review CSV. Returns (rows written, whether texts were joined in)."""
    lo, hi = parse_band(band)
    batch = client.get(batch_id)
    rows = band_rows((ln for out_part, _ in client.store.iter_parts(batch_id) for ln in out_part.split("\n")), lo, hi)
    source = Path(input_file) if input_file else (Path(batch.input_file) if batch.input_file else None)
    ordered: list[dict[str, Any]] = []
    joined = source is not None and source.is_file()
    if joined:
        assert source is not None
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for raw in f:
                digest.update(raw)
                if not raw.strip() or not rows:
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                found = rows.pop(obj.get("custom_id"), None) if isinstance(obj, dict) else None
                if found:
                    texts = _texts(obj.get("body"))
                    for r in found:
                        text = texts[r["input_index"]] if r["input_index"] < len(texts) else ""
                        r["text"] = text[:text_chars] if text_chars > 0 else text
                    ordered += found
        if batch.input_sha256 and digest.hexdigest() != batch.input_sha256:
            raise ReviewError(f"{source} changed since batch {batch_id} was submitted (its SHA-256 differs); "
                              f"pass the original file with --input")
    for rest in rows.values():  # no input file, or ids it lacks: rows without text
        ordered += rest
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(ordered)
    return len(ordered), joined
