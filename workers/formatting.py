"""Output lines: an item's engine results as the OpenAI response body of its url, with provenance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..kernels.cascade import deciders
from ..kernels.engine import Engine
from ..producers import constants as C
from ..producers import schemas as S
from ..producers.policy import Policy, model_policy
from ..producers.registry import ModelSpec

from .loading import EngineLoader, revision_of


@dataclass
class ModelFacts:
    """What formatting a model's lines needs, looked up once per call."""
    spec: ModelSpec
    engine: Engine
    revision: str
    policy: Policy | None  # classifiers: the batch's policy where it governs this model, else the model's own
    apply: Callable[[dict[str, float]], dict[str, float]] | None  # the policy's label mapping, bound


class Formatter:
    """Builds output lines; per-model facts (spec, engine, revision, policy) looked up once a call."""

    def __init__(self, loader: EngineLoader):
        self.loader = loader

    def _facts(self, model: str, policy: Policy | None) -> "ModelFacts":
        spec = self.loader.registry.get(model)
        eng = self.loader.engine(model)
        pol = apply = None
        if not spec.is_generator:
            pol = policy if policy is not None and policy.model == spec.name else model_policy(spec, eng.labels)
            apply = pol.applier(pol.sources(eng.labels))
        return ModelFacts(spec, eng, revision_of(spec, eng), pol, apply)

    def format_many(self, done: list[tuple[S.WorkItem, list[Any]]], policy: Policy | None = None,
                    shas: list[list[str] | None] | None = None) -> list[dict[str, Any]]:
        """Output lines for (item, engine results) pairs; per-model facts looked up once. A
        classifier's scores pass through the batch's `policy` when it is the policy's model, else
        through the model's own registered thresholds. `shas[i]`, where given, holds the SHA-256
        of each input of `done[i]` (prepare computed them), else they are computed here."""
        out = []
        facts: dict[str, ModelFacts] = {}
        for k, (it, results) in enumerate(done):
            f = facts.get(it.model)
            if f is None:
                f = facts[it.model] = self._facts(it.model, policy)
            spec, eng, revision, pol, apply = f.spec, f.engine, f.revision, f.policy, f.apply
            if it.url in (C.CHAT_URL, C.COMPLETIONS_URL):
                (r,) = results
                build = S.chat_body if it.url == C.CHAT_URL else S.completion_body
                body = build(spec.name, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, eng.variant)
                prov = S.provenance(spec.name, revision, eng.variant, it.input_sha256)
            else:
                build = S.moderation_body if it.url == C.MODERATIONS_URL else S.classification_body
                body = build(spec.name, [apply(r) for r in results], pol.resolved_thresholds(),
                             pol.policy_version)
                texts = it.body["input"]
                hashes = shas[k] if shas is not None else None
                if hashes is None:
                    hashes = [S.text_sha256(t) for t in S.as_inputs(texts)]
                prov = S.provenance(spec.name, revision, eng.variant, hashes[0] if isinstance(texts, str) else hashes,
                                    pol, decided_by(results, isinstance(texts, str)))
            out.append(S.output_line(it.custom_id, body, prov))
        return out


def decided_by(results: list[Any], single: bool) -> str | list[str] | None:
    """For a cascade's results, which model decided each input ("student", "middle" or "full");
    else None."""
    names = deciders(results)
    if names is None:
        return None
    return names[0] if single else names
