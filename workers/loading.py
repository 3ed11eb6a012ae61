"""Loading engines: each registered model once per process, as the variant that suits the device.

Engines load lazily on first use (or at worker start with `preload`), never at import. A model
that fails to load fails its lines for LOAD_RETRY_S before a load is tried again.
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..kernels.engine import Engine, check_engine
from ..producers import constants as C
from ..producers.errors import EngineError
from ..producers.registry import NEUTRAL_PROTOTYPES, ModelSpec
from ..producers.settings import Settings

log = logging.getLogger(__name__)


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


class EngineLoader:
    """Loads each registered model once per process, on first use (or at worker start with
    `preload`), as the variant workers/variants.py picks; keeps the engines and what it serves."""

    def __init__(self, settings: Settings, device: str = "cpu"):
        self.settings = settings
        self.registry = settings.registry
        self.device = device
        self._engines: dict[str, Engine] = {}
        self._failed: dict[str, tuple[float, Exception]] = {}  # model -> (when its load failed, the error)
        # model -> the variant this process serves and why (workers/variants.py), for `gristmill models`
        self.serving: dict[str, str] = {}
        self.on_serving: Callable[[], None] | None = None  # told when `serving` changes
        self._lock = threading.Lock()

    # -- load / check_health / shutdown
    def engine(self, name: str) -> Engine:
        eng = self._engines.get(name)
        if eng is None:
            with self._lock:
                eng = self._engines.get(name)
                if eng is None:
                    eng = self._load_or_explain(name)
                    self._engines[name] = eng
                    freeze_heap()
        return eng

    def _load_or_explain(self, name: str) -> Engine:
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

    def _load(self, spec: ModelSpec) -> Engine:
        return check_engine(self._build(spec), spec.is_generator)

    def _build(self, spec: ModelSpec):
        log.info("loading %s (%s) on %s", spec.name, spec.kind, self.device)
        path = spec.resolve_path()
        if spec.kind == "causal_lm":
            from ..kernels.generate import GenerationEngine
            return GenerationEngine(path, cache_dir=self.settings.model_cache_dir, device=self.device,
                                    max_context=spec.max_input_tokens, compile_decode=self.settings.generation_compile)
        from ..kernels.classify import ClassifierEngine
        from ..kernels.onnx_engine import read_manifest
        from .variants import choose
        st = self.settings
        choice = choose(spec, self.device, st)
        kw = dict(classifier_kwargs(spec, st.model_cache_dir), device=self.device, chunk_cache=st.tokenizer_cache,
                  fast_tokenizer=st.fast_tokenizer)
        # a directory built by `gristmill optimize` runs on ONNX Runtime or, for a torch recipe, the
        # compiled torch engine (and a cascade, on both)
        manifest = read_manifest(choice.path) if choice.artifact else None
        if manifest is not None:
            eng = load_optimized(choice.path, manifest, kw, st)
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

    def loaded(self) -> dict[str, Engine]:
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


def load_optimized(path: Path, manifest: dict, kw: dict[str, Any], settings: Settings) -> Engine:
    """The engine of a `gristmill optimize` directory (its manifest read): ONNX Runtime, a compiled
    torch recipe, or a cascade. `kw`: ClassifierEngine keyword arguments of the model it was built from."""
    from ..kernels.cascade import MANIFEST_KIND as CASCADE
    from ..kernels.optimize import artifact_engine
    if manifest.get("kind") == CASCADE:
        return _load_cascade(path, manifest, kw, settings)
    return artifact_engine(path, cpu_precision=settings.cpu_precision, **kw)


def _load_cascade(path: Path, manifest: dict, kw: dict[str, Any], settings: Settings) -> Engine:
    """The first stage inside the cascade directory (a student, or a torch recipe), and the full
    model (by its registered name, else the weights' path) in the CPU precision the manifest
    names: fp32, the reference the band was chosen against, since the inputs it decides are the
    ones near a threshold, where bf16 changes decisions (kernels/cascade.py). A manifest naming a
    middle stage (also inside the directory) puts it, as a cascade of its own, before the full
    model."""
    from ..kernels.cascade import FULL_MODEL_PRECISION, CascadeEngine
    from ..kernels.classify import ClassifierEngine
    from ..kernels.optimize import artifact_engine
    teacher_spec = settings.registry.specs.get(manifest["teacher_model"])
    teacher_path = teacher_spec.resolve_path() if teacher_spec is not None else Path(manifest["source"])
    student = artifact_engine(Path(path) / manifest["student"], cpu_precision=settings.cpu_precision, **kw)
    precision = manifest.get("full_model_precision", FULL_MODEL_PRECISION)
    teacher = ClassifierEngine(teacher_path, cpu_precision=precision, **kw)
    middle = manifest.get("middle")  # three stages: a middle stage, with a band of its own, before the full model
    if middle is not None:
        first = artifact_engine(Path(path) / middle["dir"], cpu_precision=settings.cpu_precision, **kw)
        teacher = CascadeEngine(first, teacher, band=float(middle["band"]), thresholds=manifest["thresholds"],
                                revision=f"{manifest['digest']}/middle")
    return CascadeEngine(student, teacher, band=float(manifest["band"]), thresholds=manifest["thresholds"],
                         margin=float(manifest.get("margin", 0.0)), revision=manifest["digest"])


def revision_of(spec: ModelSpec, engine: Engine) -> str:
    """The model's revision in provenance and cache keys: the registered one, else the weights'."""
    return spec.revision or engine.revision


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
