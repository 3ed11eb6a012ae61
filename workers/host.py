"""The per-process engine host: loads each model once, prepares items, runs batches, formats lines.

Engines load lazily on first use (or at worker start with `preload`), never at import.
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..producers import constants as C
from ..producers import schemas as S
from ..producers.errors import EngineError, ItemError
from ..producers.policy import Policy, model_policy
from ..producers.registry import NEUTRAL_PROTOTYPES, ModelSpec
from ..producers.settings import Settings

from . import dedup, metrics
from .batcher import model_of
from .dedup import ScoreCache

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One item made ready for the batcher: payloads for the engine, their token costs.

    Classifier items also carry each input's SHA-256 and, where the score cache answered, its
    scores (`known`, with no payload). An input repeating an earlier one of the same chunk has
    neither payload nor scores: it shares the earlier input's result."""
    item: S.WorkItem
    payloads: list[Any]
    costs: list[int]
    shas: list[str] | None = None
    known: list[dict[str, float] | None] | None = None
    mkey: str = ""  # the score-cache namespace of the item's model
    # per input: answered without running it here (cache, a repeat, or another chunk's run)
    reused: list[bool] | None = None


def freeze_heap() -> None:
    """Move every object alive now (the loaded models, torch, transformers: ~400k objects) out of
    the cyclic collector's reach. They live as long as the process, yet each full collection
    walked them all (~0.3 s on a 2-core machine, every few thousand items), charged to whichever per-item
    allocation set it off (a worker's result dicts and lists). At exit they are handed back, so that
    extensions' leak checks (nanobind's) see them go even where no host was shut down."""
    gc.collect()
    gc.freeze()
    _unfreeze_at_exit()


@functools.cache
def _unfreeze_at_exit() -> None:
    atexit.register(gc.unfreeze)


# After a model fails to load, its lines fail at once for this long before a load is tried again.
LOAD_RETRY_S = 30.0


class EngineHost:
    def __init__(self, settings: Settings, device: str = "cpu", cache: ScoreCache | None = None):
        self.settings = settings
        self.registry = settings.registry
        self.device = device
        self.cache = cache
        self._engines: dict[str, Any] = {}
        self._failed: dict[str, tuple[float, Exception]] = {}  # model -> (when its load failed, the error)
        # model -> the variant this process serves and why (workers/variants.py), for `gristmill models`
        self.serving: dict[str, str] = {}
        self.on_serving: Callable[[], None] | None = None  # told when `serving` changes
        self._lock = threading.Lock()

    # -- load / check_health / shutdown
    def engine(self, name: str):
        eng = self._engines.get(name)
        if eng is None:
            with self._lock:
                eng = self._engines.get(name)
                if eng is None:
                    eng = self._load_or_explain(name)
                    self._engines[name] = eng
                    freeze_heap()
        return eng

    def _load_or_explain(self, name: str):
        """Load a model; a failure names the model and is repeated without a new attempt for
        LOAD_RETRY_S, so the chunks that follow fail their lines for it at once instead of each
        paying a load (a corrupt or missing model directory, an out-of-memory device)."""
        failed = self._failed.get(name)
        if failed is not None and time.monotonic() - failed[0] < LOAD_RETRY_S:
            raise failed[1]
        spec = self.registry.get(name)
        try:
            eng = self._load(spec)
        except Exception as exc:
            err = EngineError(f"model {name!r} failed to load from {spec.path or spec.package}: "
                              f"{type(exc).__name__}: {exc}")
            self._failed[name] = (time.monotonic(), err)
            raise err from exc
        self._failed.pop(name, None)
        return eng

    def _load(self, spec: ModelSpec):
        log.info("loading %s (%s) on %s", spec.name, spec.kind, self.device)
        path = spec.resolve_path()
        if spec.kind == "causal_lm":
            from ..kernels.generate import GenerationEngine
            return GenerationEngine(path, cache_dir=self.settings.model_cache_dir, device=self.device,
                                    max_context=spec.max_input_tokens, compile_decode=self.settings.generation_compile)
        from ..kernels.classify import ClassifierEngine
        from ..kernels.onnx_engine import OnnxClassifierEngine, read_manifest
        from .variants import choose
        st = self.settings
        choice = choose(spec, self.device, st)
        kw = dict(classifier_kwargs(spec, st.model_cache_dir), device=self.device, chunk_cache=st.tokenizer_cache,
                  fast_tokenizer=st.fast_tokenizer)
        # a directory built by `gristmill optimize` runs on ONNX Runtime (and a cascade, on both)
        manifest = read_manifest(choice.path) if choice.artifact else None
        if manifest is not None and manifest.get("kind") == "cascade":
            eng = self._load_cascade(spec, choice.path, manifest, kw)
        elif manifest is not None:
            eng = OnnxClassifierEngine(choice.path, **kw)
        else:
            eng = ClassifierEngine(path, cpu_precision=st.cpu_precision, quantize=st.engine_quantize,
                                   sparsity=st.engine_sparsity, compile=st.engine_compile, **kw)
        self.serving[spec.name] = f"{eng.variant}: {choice.reason}"
        log.info("serving %s as %s", spec.name, self.serving[spec.name])
        if self.on_serving is not None:
            try:
                self.on_serving()
            except Exception:  # noqa: BLE001 - the next heartbeat publishes it
                log.warning("could not publish what this worker serves", exc_info=True)
        return eng

    def _load_cascade(self, spec: ModelSpec, path, manifest: dict, kw: dict):
        """The student artifact inside the cascade directory, and the full model (by its registered
        name, else the weights' path) in the CPU precision setting: bf16 autocast where the CPU has
        native bf16, which kept every flag of fp32, the reference the band was chosen against."""
        from ..kernels.cascade import CascadeEngine
        from ..kernels.classify import ClassifierEngine
        from ..kernels.onnx_engine import OnnxClassifierEngine
        teacher_spec = self.registry.specs.get(manifest["teacher_model"])
        teacher_path = teacher_spec.resolve_path() if teacher_spec is not None else Path(manifest["source"])
        student = OnnxClassifierEngine(Path(path) / manifest["student"], **kw)
        teacher = ClassifierEngine(teacher_path, cpu_precision=self.settings.cpu_precision, **kw)
        return CascadeEngine(student, teacher, band=float(manifest["band"]), thresholds=manifest["thresholds"],
                             margin=float(manifest.get("margin", 0.0)), revision=manifest["digest"])

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
        gc.unfreeze()  # the engines just dropped (and whatever was frozen with them) collectable again

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
            shas = [S.text_sha256(t) for t in flat]
            mkey = self.model_key(model)
            cached = [None] * len(flat)
            if self.cache is not None:
                try:
                    cached = self.cache.lookup(mkey, shas)
                except Exception:  # noqa: BLE001 - the cache is an optimisation: on a Redis error, run the inputs
                    metrics.CACHE_ERRORS.labels("lookup").inc()
                    log.warning("score cache lookup failed; running the inputs", exc_info=True)
            fields = score_fields(eng)
            known = [None if c is None else dedup.unpack(c, fields) for c in cached]
            if self.cache is not None and self.cache.enabled:
                hits = len(known) - known.count(None)
                metrics.CACHE_INPUTS.labels(model, "hit").inc(hits)
                metrics.CACHE_INPUTS.labels(model, "miss").inc(len(known) - hits)
            first: dict[str, int] = {}
            todo = [j for j, sha in enumerate(shas) if known[j] is None and first.setdefault(sha, j) == j]
            ids = dict(zip(todo, eng.encode([flat[j] for j in todo])))  # tokenize only what will run
            k = 0
            for i, texts in entries:
                span = range(k, k + len(texts))
                k += len(texts)
                payloads = [ids.get(j) for j in span]
                out[i] = Prepared(items[i], payloads, [len(p) if p is not None else 0 for p in payloads],
                                  [shas[j] for j in span], [known[j] for j in span], mkey,
                                  [ids.get(j) is None for j in span])
        return out  # type: ignore[return-value]

    def model_key(self, model: str) -> str:
        """The score-cache namespace of a loaded classifier: what ran, down to the variant."""
        eng = self.engine(model)
        return dedup.model_key(model, self.revision(self.registry.get(model), eng), eng.variant, score_fields(eng))

    def settle(self, done: list[tuple[Prepared, list[Any]]]) -> tuple[list[tuple[S.WorkItem, list[Any]]], int, int]:
        """Classifier results made canonical: new scores go into the cache, and where another
        writer stored the same text first, its scores stand. Returns (item, results) pairs, one
        per pair of `done` and in its order, the classifier inputs seen and those reused (cache
        hits and repeats within the chunk)."""
        computed: dict[str, dict[str, Any]] = {}  # model -> sha -> scores
        inputs = reused = 0
        for p, results in done:
            if p.shas is None:
                continue
            inputs += len(p.shas)
            for sha, was_reused, r in zip(p.shas, p.reused or [], results):
                if was_reused:
                    reused += 1
                else:
                    computed.setdefault(p.item.model, {})[sha] = r
        # Engines return float32 scores, the cache's own precision, so a line keeps its computed
        # scores unless another writer's stand.
        final: dict[str, dict[str, dict[str, float]]] = {}  # model -> sha -> another writer's scores
        caching = self.cache is not None and self.cache.enabled
        for model, by_sha in computed.items() if caching else ():
            labels = score_fields(self.engine(model))
            packed = [dedup.pack(v, labels) for v in by_sha.values()]
            try:
                earlier = self.cache.publish(self.model_key(model), list(by_sha), packed)  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - the cache is an optimisation; a Redis hiccup must not fail lines
                metrics.CACHE_ERRORS.labels("publish").inc()
                log.warning("score cache publish failed; lines keep their own scores", exc_info=True)
                continue
            theirs = {sha: dedup.unpack(v, labels) for sha, v in zip(by_sha, earlier) if v is not None}
            if theirs:  # usually none: then no line is looked up below
                final[model] = theirs
        out = []
        for p, results in done:
            if p.shas is not None and p.item.model in final:
                table = final[p.item.model]
                results = [table.get(sha, r) for sha, r in zip(p.shas, results)]
            out.append((p.item, results))
        return out, inputs, reused

    def _prepare_generation(self, it: S.WorkItem, spec: ModelSpec) -> Prepared | S.LineError:
        from ..kernels.generate import EmptyPrompt, GenRequest, PromptTooLong
        eng = self.engine(it.model)
        if it.url == C.CHAT_URL:
            body = S.ChatBody.model_validate(it.body)
            ids = eng.encode_chat([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                   for m in body.messages])
            max_tokens = body.max_completion_tokens or body.max_tokens or spec.default_max_tokens
        else:
            body = S.CompletionBody.model_validate(it.body)
            try:
                ids = eng.encode_prompt(body.prompt)
            except EmptyPrompt as e:
                return S.LineError(it.line, it.custom_id, C.E_INVALID_BODY, f"body.{e}")
            max_tokens = body.max_tokens or 16  # OpenAI's completions default
        try:
            budget = eng.budget(len(ids), max_tokens)
        except PromptTooLong as e:
            return S.LineError(it.line, it.custom_id, C.E_CONTEXT_LENGTH, str(e))
        req = GenRequest(ids, budget, body.temperature, body.top_p, body.seed, body.stop_list())
        return Prepared(it, [req], [len(ids) + budget])

    def run(self, key: str, payloads: list[Any]) -> list[Any]:
        """`key` is a batcher key: the model, maybe tagged (workers/batcher.py)."""
        try:
            return self.engine(model_of(key)).run(payloads)
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

    def format(self, it: S.WorkItem, results: list[Any], policy: Policy | None = None) -> dict[str, Any]:
        return self.format_many([(it, results)], policy)[0]

    def format_many(self, done: list[tuple[S.WorkItem, list[Any]]], policy: Policy | None = None,
                    shas: list[list[str] | None] | None = None) -> list[dict[str, Any]]:
        """Output lines for (item, engine results) pairs; per-model facts looked up once. A
        classifier's scores pass through the batch's `policy` when it is the policy's model, else
        through the model's own registered thresholds. `shas[i]`, where given, holds the SHA-256
        of each input of `done[i]` (prepare computed them), else they are computed here."""
        out = []
        facts: dict[str, tuple] = {}
        for k, (it, results) in enumerate(done):
            f = facts.get(it.model)
            if f is None:
                spec = self.registry.get(it.model)
                eng = self.engine(it.model)
                pol = apply = None
                if not spec.is_generator:
                    pol = policy if policy is not None and policy.model == spec.name else model_policy(spec, eng.labels)
                    apply = pol.applier(pol.sources(eng.labels))
                f = facts[it.model] = (spec, eng, self.revision(spec, eng), pol, apply)
            spec, eng, revision, pol, apply = f
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


def classifier_kwargs(spec: ModelSpec, cache_dir=None) -> dict[str, Any]:
    """ClassifierEngine keyword arguments for a registered classifier. A head given as a seed set
    is trained (once, then cached under `cache_dir`, default the settings' model cache) on the
    encoder's weights: for an optimized artifact, those of the model it was built from, so that an
    artifact and its source share one head."""
    kw: dict[str, Any] = {"max_length": spec.max_input_tokens}
    if spec.kind == "zero_shot":
        kw.update(prototypes=spec.prototypes, neutral=NEUTRAL_PROTOTYPES)
    elif spec.kind == "embedding_classifier":
        head = spec.resolve_head()
        if head is not None and head.suffix == ".jsonl":
            from ..kernels.heads import ensure_head
            from ..kernels.onnx_engine import read_manifest
            encoder = spec.resolve_path()
            manifest = read_manifest(encoder) if encoder.is_dir() else None
            if manifest is not None:
                encoder = Path(manifest["source"])
            head = ensure_head(encoder, head, cache_dir or Settings().model_cache_dir)
        kw.update(head=head)
    return kw


def score_fields(engine) -> list[str]:
    """What the score cache keeps per input: the labels, and for a cascade whether it escalated."""
    return list(getattr(engine, "score_fields", engine.labels))


def decided_by(results: list[Any], single: bool) -> str | list[str] | None:
    """For a cascade's results, which model decided each input ("student" or "full"); else None."""
    from ..kernels.cascade import ESCALATED
    if not results or not isinstance(results[0], dict) or ESCALATED not in results[0]:
        return None
    names = ["full" if r.get(ESCALATED) else "student" for r in results]
    return names[0] if single else names


def item_error(it: S.WorkItem, exc: BaseException) -> dict[str, Any]:
    code = exc.code if isinstance(exc, ItemError) else C.E_ENGINE
    return S.error_line(it.custom_id, code, f"{type(exc).__name__}: {exc}", it.line)
