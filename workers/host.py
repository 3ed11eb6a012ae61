"""The per-process engine host: loads each model once, prepares items, runs batches, formats lines.

Engines load lazily on first use (or at worker start with `preload`), never at import.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from producers import constants as C
from producers import schemas as S
from producers.errors import ItemError
from producers.registry import NEUTRAL_PROTOTYPES, ModelSpec
from producers.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One item made ready for the batcher: payloads for the engine, their token costs."""
    item: S.WorkItem
    payloads: list[Any]
    costs: list[int]


class EngineHost:
    def __init__(self, settings: Settings, device: str = "cpu"):
        self.settings = settings
        self.registry = settings.registry
        self.device = device
        self._engines: dict[str, Any] = {}
        self._lock = threading.Lock()

    # -- load / check_health / shutdown
    def engine(self, name: str):
        eng = self._engines.get(name)
        if eng is None:
            with self._lock:
                eng = self._engines.get(name)
                if eng is None:
                    eng = self._load(self.registry.get(name))
                    self._engines[name] = eng
        return eng

    def _load(self, spec: ModelSpec):
        log.info("loading %s (%s) on %s", spec.name, spec.kind, self.device)
        path = spec.resolve_path()
        if spec.kind == "causal_lm":
            from kernels.generate import GenerationEngine
            return GenerationEngine(path, cache_dir=self.settings.model_cache_dir, device=self.device,
                                    max_context=spec.max_input_tokens)
        from kernels.classify import ClassifierEngine
        from kernels.onnx_engine import OnnxClassifierEngine, read_manifest
        # a directory built by `gristmill optimize` runs on ONNX Runtime
        if read_manifest(path) is not None:
            return OnnxClassifierEngine(path, device=self.device, **classifier_kwargs(spec))
        st = self.settings
        return ClassifierEngine(path, device=self.device, cpu_precision=st.cpu_precision, quantize=st.engine_quantize,
                                sparsity=st.engine_sparsity, compile=st.engine_compile, **classifier_kwargs(spec))

    def loaded(self) -> dict[str, Any]:
        """The engines loaded so far, by model name."""
        return dict(self._engines)

    def preload(self, queues: list[str]) -> None:
        for url, name in self.registry.defaults.items():
            if C.URL_QUEUE[url] in queues:
                self.engine(name)

    def check_health(self) -> dict[str, bool]:
        return {name: bool(e.check_health()) for name, e in self._engines.items()}

    def shutdown(self) -> None:
        for e in self._engines.values():
            e.shutdown()
        self._engines.clear()

    def revision(self, spec: ModelSpec, engine) -> str:
        return spec.revision or engine.revision

    # -- prepare (task threads) / run (engine thread) / format (task threads)
    def prepare(self, items: list[S.WorkItem]) -> list[Prepared | S.LineError]:
        """Tokenize a chunk's items, one tokenizer call per classifier model for the whole chunk."""
        out: list[Prepared | S.LineError | None] = [None] * len(items)
        texts_by_model: dict[str, list[tuple[int, list[str]]]] = {}
        for i, it in enumerate(items):
            spec = self.registry.specs.get(it.model)
            if spec is None:
                out[i] = S.LineError(it.line, it.custom_id, C.E_MODEL_NOT_FOUND,
                                     f"this worker has no model {it.model!r}; producers and workers must "
                                     f"share the same model registrations (GRISTMILL_MODELS_FILE)")
            elif spec.is_generator:
                out[i] = self._prepare_generation(it, spec)
            else:
                # validated at ingest: no second pydantic pass per item here
                texts_by_model.setdefault(it.model, []).append((i, S.as_inputs(it.body["input"])))
        for model, entries in texts_by_model.items():
            eng = self.engine(model)
            flat = [t for _, texts in entries for t in texts]
            ids = eng.encode(flat)
            k = 0
            for i, texts in entries:
                payloads = ids[k: k + len(texts)]
                k += len(texts)
                out[i] = Prepared(items[i], payloads, [len(p) for p in payloads])
        return out  # type: ignore[return-value]

    def _prepare_generation(self, it: S.WorkItem, spec: ModelSpec) -> Prepared | S.LineError:
        from kernels.generate import GenRequest, PromptTooLong
        eng = self.engine(it.model)
        if it.url == C.CHAT_URL:
            body = S.ChatBody.model_validate(it.body)
            ids = eng.encode_chat([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                   for m in body.messages])
            max_tokens = body.max_completion_tokens or body.max_tokens or spec.default_max_tokens
        else:
            body = S.CompletionBody.model_validate(it.body)
            ids = eng.encode_prompt(body.prompt)
            max_tokens = body.max_tokens or 16  # OpenAI's completions default
        try:
            budget = eng.budget(len(ids), max_tokens)
        except PromptTooLong as e:
            return S.LineError(it.line, it.custom_id, C.E_CONTEXT_LENGTH, str(e))
        req = GenRequest(ids, budget, body.temperature, body.top_p, body.seed, body.stop_list())
        return Prepared(it, [req], [len(ids) + budget])

    def run(self, model: str, payloads: list[Any]) -> list[Any]:
        try:
            return self.engine(model).run(payloads)
        except Exception as exc:
            self._release_if_oom(exc)
            raise

    def streamer(self, model: str):
        """The batcher's continuous runner for a generation model on the continuous loop (requests
        join the running batch as they arrive and finish one by one), else None."""
        spec = self.registry.specs.get(model)
        if spec is None or not spec.is_generator or getattr(self.engine(model), "loop", None) is None:
            return None

        def stream(key: str, payloads: list[Any], pull, finish) -> None:
            try:
                self.engine(key).run(payloads, more=pull, on_done=finish)
            except Exception as exc:
                self._release_if_oom(exc)
                raise
        return stream

    def _release_if_oom(self, exc: Exception) -> None:
        if "out of memory" in str(exc).lower() and self.device.startswith("cuda"):
            import torch
            torch.cuda.empty_cache()  # give the cached blocks back before the batcher retries halves

    def format(self, it: S.WorkItem, results: list[Any]) -> dict[str, Any]:
        return self.format_many([(it, results)])[0]

    def format_many(self, done: list[tuple[S.WorkItem, list[Any]]]) -> list[dict[str, Any]]:
        """Output lines for (item, engine results) pairs; per-model facts looked up once."""
        out = []
        facts: dict[str, tuple] = {}
        for it, results in done:
            f = facts.get(it.model)
            if f is None:
                spec = self.registry.get(it.model)
                eng = self.engine(it.model)
                labels = getattr(eng, "labels", [])
                f = facts[it.model] = (spec, eng, self.revision(spec, eng),
                                       {label: spec.threshold(label) for label in labels})
            spec, eng, revision, thresholds = f
            prov = S.provenance(spec.name, revision, eng.variant, it.input_sha256)
            if it.url in (C.CHAT_URL, C.COMPLETIONS_URL):
                (r,) = results
                build = S.chat_body if it.url == C.CHAT_URL else S.completion_body
                body = build(spec.name, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, eng.variant)
            else:
                build = S.moderation_body if it.url == C.MODERATIONS_URL else S.classification_body
                body = build(spec.name, results, thresholds, spec.policy_version)
            out.append(S.output_line(it.custom_id, body, prov))
        return out


def classifier_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """ClassifierEngine keyword arguments for a registered classifier (zero-shot or not)."""
    kw: dict[str, Any] = {"max_length": spec.max_input_tokens}
    if spec.kind == "zero_shot":
        kw.update(prototypes=spec.prototypes, neutral=NEUTRAL_PROTOTYPES)
    return kw


def item_error(it: S.WorkItem, exc: BaseException) -> dict[str, Any]:
    code = exc.code if isinstance(exc, ItemError) else C.E_ENGINE
    return S.error_line(it.custom_id, code, f"{type(exc).__name__}: {exc}", it.line)
