"""Moderation policies: which model scores which labels, the per-label thresholds, a version.

A policy is data (YAML or JSON), so a moderation team changes thresholds without redeploying:
`gristmill submit --policy FILE` applies one to a batch, GRISTMILL_MODERATION_POLICY sets the
default, and the shipped default lives in gristmill/producers/policies/. The producer resolves the policy
once per batch and sends it with every classification message, so a worker applies exactly the
policy the batch was validated against, and each result line names its version and a digest of
its thresholds.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigurationError
from .registry import MODERATION_CATEGORIES
from .runtime import data_file

DEFAULT_POLICY_FILE = data_file(__package__, "policies", "moderation-default.yaml")
# Model names of OpenAI's moderation endpoint: files written for OpenAI carry them on every line,
# and they mean "the moderation model", which here is the policy's.
OPENAI_MODERATION_MODELS = ("omni-moderation-", "text-moderation-")


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy_version: str = Field(min_length=1)
    model: str = Field(min_length=1)  # a registered classifier, by name or alias
    labels: tuple[str, ...] = MODERATION_CATEGORIES
    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    label_map: dict[str, str] = Field(default_factory=dict)  # model label -> policy label

    @model_validator(mode="after")
    def _consistent(self) -> "Policy":
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: give a non-empty list without repeats")
        unknown = sorted(set(self.thresholds) - set(self.labels))
        if unknown:
            raise ValueError(f"thresholds: {unknown} are not among the policy's labels")
        bad = {k: v for k, v in self.thresholds.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"thresholds: each must lie in [0, 1]; fix {bad}")
        stray = sorted(v for v in self.label_map.values() if v not in self.labels)
        if stray:
            raise ValueError(f"label_map: targets {stray} are not among the policy's labels")
        return self

    def threshold(self, label: str) -> float:
        return self.thresholds.get(label, self.default_threshold)

    # Both are read for every result line: computed once per instance (the model is frozen), and
    # dropped by model_copy, whose update may change what they derive from.
    @cached_property
    def _resolved(self) -> dict[str, float]:
        return {label: self.threshold(label) for label in self.labels}

    def resolved_thresholds(self) -> dict[str, float]:
        return dict(self._resolved)

    @cached_property
    def thresholds_digest(self) -> str:
        """SHA-256 (first 16 hex digits) of the label -> threshold map that decides `flagged`."""
        blob = json.dumps(self._resolved, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "Policy":
        copy = super().model_copy(update=update, deep=deep)
        for name in ("_resolved", "thresholds_digest"):
            copy.__dict__.pop(name, None)
        return copy

    def sources(self, model_labels: list[str]) -> dict[str, list[str]]:
        """Policy label -> the model labels whose scores it takes (the highest wins). Raises
        ValueError naming the labels no model label feeds."""
        out: dict[str, list[str]] = {label: [] for label in self.labels}
        for m in model_labels:
            target = self.label_map.get(m, m)
            if target in out:
                out[target].append(m)
        missing = [label for label, src in out.items() if not src]
        if missing:
            raise ValueError(f"policy {self.policy_version}: no label of model {self.model} feeds {missing}; the "
                             f"model's labels are {model_labels}. Map them with label_map or drop these labels.")
        return out

    def apply(self, scores: dict[str, float], sources: dict[str, list[str]]) -> dict[str, float]:
        """A model's {label: score} as the policy's {label: score}."""
        # most policy labels have one source: index it rather than run max() over a generator
        return {label: scores[src[0]] if len(src) == 1 else max(scores[m] for m in src)
                for label, src in sources.items()}

    def applier(self, sources: dict[str, list[str]]) -> Callable[[dict[str, float]], dict[str, float]]:
        """`apply` with `sources` bound, for many lines: where every policy label has one source,
        one C-level itemgetter call per line instead of a comprehension."""
        labels, srcs = list(sources), list(sources.values())
        if not srcs or any(len(src) != 1 for src in srcs):
            return partial(self.apply, sources=sources)
        get = operator.itemgetter(*(src[0] for src in srcs))
        if len(labels) == 1:
            return lambda scores: {labels[0]: get(scores)}
        return lambda scores: dict(zip(labels, get(scores)))

    def wire(self) -> dict[str, Any]:
        """The JSON form carried in messages and batch records."""
        return self.model_dump(mode="json")


def load_policy(path: Path) -> Policy:
    """A policy from a YAML or JSON file; errors name the file and the field."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigurationError(f"cannot read policy file {path}: {e}") from e
    as_json = path.suffix.lower() == ".json"
    try:
        raw = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigurationError(f"policy file {path} is not valid {'JSON' if as_json else 'YAML'}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigurationError(f"policy file {path} must hold one mapping (policy_version, model, thresholds, ...)")
    try:
        return Policy.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "policy"
        raise ConfigurationError(f"policy file {path}: {loc}: {first['msg']}") from e


def model_policy(spec, labels: list[str]) -> Policy:
    """The policy a classifier's own registration implies (its thresholds and policy_version), for
    lines that no batch policy covers: /v1/classifications lines naming another model."""
    return Policy(policy_version=spec.policy_version, model=spec.name, labels=tuple(labels),
                  thresholds={k: v for k, v in spec.thresholds.items() if k in labels},
                  default_threshold=spec.default_threshold)


def is_openai_moderation_model(name: str | None) -> bool:
    return name is not None and name.startswith(OPENAI_MODERATION_MODELS)
