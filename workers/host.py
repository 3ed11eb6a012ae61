"""The per-process engine host: prepares a chunk's items for the batcher (tokenize, score-cache
lookup), runs batches on the engine thread, settles new scores into the cache and has the lines
formatted. Engines come from workers/loading.py, output lines from workers/formatting.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..kernels.cascade import CascadeEngine
from ..kernels.engine import Engine, Generator
from ..producers import constants as C
from ..producers import schemas as S
from ..producers.errors import ItemError
from ..producers.policy import Policy
from ..producers.registry import ModelSpec
from ..producers.settings import Settings

from . import dedup, metrics
from .batcher import KEY_TAG, BatchPolicy, MicroBatcher, Requeue, model_of, tagged
from .dedup import ScoreCache
from .formatting import Formatter
from .loading import EngineLoader, revision_of
from .records import ClassifierInputs, Prepared

log = logging.getLogger(__name__)


class EngineHost:
    """A worker process's path around the engines: prepare a chunk's items (tokenize, look up the
    score cache), run batches on the engine thread, settle and format the results. Loading is
    `EngineLoader`'s job (workers/loading.py), output lines `Formatter`'s (workers/formatting.py)."""

    def __init__(self, settings: Settings, device: str = "cpu", cache: ScoreCache | None = None):
        self.settings = settings
        self.registry = settings.registry
        self.device = device
        self.cache = cache
        self.loader = EngineLoader(settings, device)
        self.formatter = Formatter(self.loader)

    def engine(self, name: str) -> Engine:
        return self.loader.engine(name)

    def loaded(self) -> dict[str, Engine]:
        return self.loader.loaded()

    @property
    def serving(self) -> dict[str, str]:
        return self.loader.serving

    def preload(self, queues: list[str]) -> None:
        self.loader.preload(queues)

    def check_health(self) -> dict[str, bool]:
        return self.loader.check_health()

    def shutdown(self) -> None:
        self.loader.shutdown()

    def revision(self, spec: ModelSpec, engine: Engine) -> str:
        return revision_of(spec, engine)

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
            fields = eng.score_fields
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
                                  ClassifierInputs(mkey, [shas[j] for j in span], [known[j] for j in span],
                                                   [ids.get(j) is None for j in span]))
        return out  # type: ignore[return-value]

    def model_key(self, model: str) -> str:
        """The score-cache namespace of a loaded classifier: what ran, down to the variant."""
        eng = self.engine(model)
        return dedup.model_key(model, self.revision(self.registry.get(model), eng), eng.variant, eng.score_fields)

    def settle(self, done: list[tuple[Prepared, list[Any]]]) -> tuple[list[tuple[S.WorkItem, list[Any]]], int, int]:
        """Classifier results made canonical: new scores go into the cache, and where another
        writer stored the same text first, its scores stand. Returns (item, results) pairs, one
        per pair of `done` and in its order, the classifier inputs seen and those reused (cache
        hits and repeats within the chunk)."""
        computed: dict[str, dict[str, Any]] = {}  # model -> sha -> scores
        inputs = reused = 0
        for p, results in done:
            if p.inputs is None:
                continue
            inputs += len(p.inputs.sha256)
            for sha, was_reused, r in zip(p.inputs.sha256, p.inputs.reused, results):
                if was_reused:
                    reused += 1
                else:
                    computed.setdefault(p.item.model, {})[sha] = r
        # Engines return float32 scores, the cache's own precision, so a line keeps its computed
        # scores unless another writer's stand.
        final: dict[str, dict[str, dict[str, float]]] = {}  # model -> sha -> another writer's scores
        caching = self.cache is not None and self.cache.enabled
        for model, by_sha in computed.items() if caching else ():
            labels = self.engine(model).score_fields
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
            if p.inputs is not None and p.item.model in final:
                table = final[p.item.model]
                results = [table.get(sha, r) for sha, r in zip(p.inputs.sha256, results)]
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
            return run_stage(self.engine(model_of(key)), key, payloads)
        except Exception as exc:
            self._release_if_oom(exc)
            raise

    def streamer(self, model: str):
        """The batcher's continuous runner for a generation model on the continuous loop (requests
        join the running batch as they arrive and finish one by one), else None."""
        spec = self.registry.specs.get(model)
        if spec is None or not spec.is_generator:
            return None
        eng = self.engine(model)
        if not isinstance(eng, Generator) or eng.loop is None:
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
        return self.formatter.format_many([(it, results)], policy)[0]

    def format_many(self, done: list[tuple[S.WorkItem, list[Any]]], policy: Policy | None = None,
                    shas: list[list[str] | None] | None = None) -> list[dict[str, Any]]:
        return self.formatter.format_many(done, policy, shas)


# A cascade's escalated inputs go back to the batcher under their key with this tag added.
ESCALATED_TAG = "escalated"


def run_stage(engine: Engine, key: str, payloads: list[Any]) -> list[Any]:
    """One device batch of batcher key `key` through `engine`. A cascade runs in two stages: its
    student screens every input, and those near a threshold come back as `Requeue`s to the same
    key tagged ESCALATED_TAG, where the batcher gathers them from many batches into the full
    model's own batches (a call of the full model per batch, for its few escalated inputs, cost
    more than those inputs themselves)."""
    if not isinstance(engine, CascadeEngine):
        return engine.run(payloads)
    if key.endswith(KEY_TAG + ESCALATED_TAG):
        return engine.decide(payloads)
    up = Requeue(tagged(key, ESCALATED_TAG))
    return [up if r is None else r for r in engine.screen(payloads)]


def served_throughput(engine: Engine, texts: list[str], *, batch: int = 64, repeats: int = 2,
                      max_wait_s: float = 0.005, stages: bool = True) -> tuple[float, list[dict[str, float]]]:
    """(items/s, scores in input order) of `engine` as a worker runs it: every text submitted to a
    micro-batcher at once, batched by token count up to `batch` (a cascade's escalated inputs
    batched again among themselves; with `stages` False, each batch's own escalated inputs as one
    call of the full model instead), best of `repeats`. kernels/optimize.py `throughput` runs one
    batch after another, sorted by characters."""
    if not texts:
        return 0.0, []
    ids = engine.encode(texts)
    engine.run(ids[:batch])  # warm-up, both stages
    costs = [len(x) for x in ids]
    batcher = MicroBatcher((lambda key, p: run_stage(engine, key, p)) if stages else (lambda key, p: engine.run(p)),
                           BatchPolicy(batch, batch * max(costs), max_wait_s), name="gristmill-served-throughput")
    best, rows = 0.0, []
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            rows = [s.result() for s in batcher.submit("served", ids, costs)]
            best = max(best, len(ids) / (time.perf_counter() - t))
    finally:
        batcher.shutdown()
    return best, rows


def timed_in_turns(engines: dict[str, Engine], texts: list[str], *, rounds: int = 3,
                   timer=served_throughput) -> tuple[dict[str, float], dict[str, list[dict[str, float]]]]:
    """(each engine's items/s, its rows of the last round) as `timer` times it (default as a worker
    runs it, `served_throughput`; kernels/optimize.py `throughput` takes the same arguments), the
    engines taking turns for `rounds` rounds and the best round of each counting: a slow moment on a
    shared machine then falls on all of them, not on whichever was timed alone at the time."""
    best = dict.fromkeys(engines, 0.0)
    rows: dict[str, list[dict[str, float]]] = {}
    for _ in range(rounds):
        for name, engine in engines.items():
            ips, rows[name] = timer(engine, texts, repeats=1)
            best[name] = max(best[name], ips)
    return best, rows


def item_error(it: S.WorkItem, exc: BaseException) -> dict[str, Any]:
    code = exc.code if isinstance(exc, ItemError) else C.E_ENGINE
    return S.error_line(it.custom_id, code, f"{type(exc).__name__}: {exc}", it.line)
