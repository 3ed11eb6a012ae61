"""Settings: every knob, its default and why, validated when built. Env prefix GRISTMILL_."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import constants as C
from .errors import ConfigurationError


def _default_home() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "gristmill"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRISTMILL_", extra="ignore", validate_default=True)

    # Redis. Unset: `gristmill up` starts an embedded redis-server and records its url under `home`.
    redis_url: str | None = None
    # With a Sentinel URL (sentinel://host:26379;sentinel://host2:26379/0, Celery's form), the name
    # the sentinels know the primary by.
    redis_master_name: str = C.REDIS_MASTER_NAME
    # Replicas that must hold a chunk's results (and each message ingest sends) before they count
    # as written (Redis WAIT). Replication is asynchronous: without this, a failover can drop a
    # write the old primary acknowledged. Set 1 with a replica and Sentinel; 0 (no replica) keeps
    # what an AOF gives (docs/reliability.md).
    redis_min_replicas: int = Field(default=0, ge=0, le=16)
    # State directory: embedded Redis data (AOF), converted model cache, logs.
    home: Path = Field(default_factory=_default_home)

    # Models: extra registrations (JSON list of ModelSpec), and whether the built-ins stay registered.
    models_file: Path | None = None
    builtin_models: bool = True

    # Ingest. Lines per Celery message. One message per line costs ~1 ms of broker work (DESIGN.md:
    # ~800 msgs/s); 256 lines amortise that to ~4 us a line while a message stays ~100 kB.
    chunk_size: int = Field(default=256, ge=1, le=100_000)
    # A message also ends once its lines reach this many bytes, so that long lines (up to
    # MAX_LINE_BYTES each) never make a message of hundreds of MB for a worker to hold and decode;
    # typical lines (~0.7 kB) fill CHUNK_SIZE first.
    chunk_max_bytes: int = Field(default=8 << 20, ge=1024)
    # Longest input line accepted; a longer one is a per-line invalid_body error. It bounds what
    # one line can put in a message, in Redis and in a worker's memory. 1 MiB holds ~250k tokens.
    max_line_bytes: int = Field(default=1 << 20, ge=1024)
    # Processes that validate and enqueue a file's lines (pass 2), each over its own byte range.
    # One process does ~27k lines/s on a 2-core development machine, less than one H100 worker
    # takes. 0 = auto: one per core (at most 8) for files of 200,000 lines or more on hosts with 4+
    # cores, else 1 (starting a process costs ~1 s; on 2 cores it did not pay).
    ingest_processes: int = Field(default=0, ge=0, le=64)
    # Backpressure: ingest waits while a queue holds more than this many lines (its messages times
    # CHUNK_SIZE) and resumes as workers drain it, so that many large files submitted at once keep
    # one bounded backlog in Redis (~110 bytes a queued line) instead of each its whole file. It is
    # seconds of work even for a fast GPU worker (80k lines/s: ~3 s). 0: no bound.
    max_queued_lines: int = Field(default=250_000, ge=0)

    # Micro-batching (per worker process). Defaults measured on a 2-core CPU with MiniLM-L6
    # (benchmarks/README.md, "Choosing the batch defaults"); a GPU worker raises them (see `for_device`).
    max_batch_size: int = Field(default=64, ge=1)
    token_budget: int = Field(default=16_384, ge=16)  # padded tokens per device batch
    max_wait_ms: float = Field(default=5.0, ge=0.0)
    # Classifier precision on CPUs: auto = bf16 autocast where the CPU has native bf16 (AVX-512 BF16
    # or AMX), fp32 elsewhere. GPUs always run bf16.
    cpu_precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Torch classifier variants (benchmarks/README.md, "Classifier precision and engine variants"). engine_quantize:
    # int8-weight-only (int8 weights, bf16 activations, a Triton kernel), int8-dynamic (int8 weights
    # and activations, torch._int_mm), int8-rows (the CPU's: int8 with an asymmetric range per
    # activation row, q/k/v kept in bf16/fp32; pays with engine_compile), fp8-dynamic (fp8 e4m3
    # weights and activations with row-wise scales, torch._scaled_mm; Hopper or newer), fp8-static
    # (per-tensor scales, the activations' fixed by calibration on built-in sentences);
    # engine_sparsity: 2:4 magnitude sparsity (no retraining: measure agreement first);
    # engine_compile: torch.compile the model (fuses the elementwise work between matmuls; it
    # compiles as it loads). Default: plain eager.
    engine_quantize: Literal["none", "int8-weight-only", "int8-dynamic", "int8-rows", "fp8-dynamic",
                             "fp8-static"] = "none"
    engine_sparsity: Literal["none", "2:4"] = "none"
    engine_compile: bool = False
    # Classifier tokenizing through a cache of whitespace chunks (kernels/tokenize.py), for BERT-style
    # tokenizers: the same ids as the Rust tokenizer, 5-10x its rate per core on warm text. Off by
    # default: it holds the GIL, and a thread tokenizing without pause cut the op rate of a thread
    # issuing tiny torch ops (as a GPU engine thread issues launches) from 189k/s to 1.2k/s, where
    # the Rust tokenizer, which releases the GIL, left 189k/s (benchmarks/README.md, "Host limits").
    tokenizer_cache: bool = False
    # A worker on a CPU serves the fastest optimized artifact of a model that `gristmill optimize`
    # kept under $GRISTMILL_HOME/models/optimized/<model> whose stored agreement with fp32 meets these
    # floors (per-label flags, texts whose flags are all identical); else bf16 where the device has
    # it (workers/variants.py). false: always the torch engine as registered.
    auto_variants: bool = True
    variant_min_flags: float = Field(default=0.9995, ge=0.0, le=1.0)
    variant_min_texts: float = Field(default=0.995, ge=0.0, le=1.0)
    # ... and whose build measured it at least this many times as fast as the engine a worker serves
    # without it (bf16 where the CPU has it; measured in the same build): 1.0 = not slower; 0 = any.
    variant_min_gain: float = Field(default=1.0, ge=0.0)
    # Pure-ASCII classifier inputs tokenized by flash-tokenizer's C++ BERT tokenizer where it gives
    # the Rust tokenizer's ids (kernels/tokenize.py, AsciiWordPiece): ~6 us a text against ~100 us on
    # one core of the 2-core test machine. It holds the GIL for those ~6 us per text, beside the
    # ~110 us of Python a worker's task path holds it for per item anyway (benchmarks/README.md,
    # "A worker's cost per item around the model"). Other texts take the chunk cache or the Rust tokenizer.
    fast_tokenizer: bool = True
    # Generation on CUDA: compile the decode step's per-layer work inside its CUDA graphs (benchmarks/README.md,
    # "Generation"): 1.8-2.0x the tokens/s of the graphed eager step on the H100, for ~10 s of
    # compiling when a worker first decodes. CPUs never compile.
    generation_compile: bool = True
    # Messages a worker works on at once (threads in its pool); the batcher merges their items.
    worker_concurrency: int = Field(default=4, ge=1, le=256)
    # Worker processes per GPU, each with its own engine and CUDA context (Triton's instance_group
    # count). On a fast GPU one process's Python (tokenizing, formatting, JSON) cannot keep up:
    # the processes share the GPU by time-slicing and spread the per-item CPU work over cores.
    # 1 on CPU hosts, where the engine itself uses every core.
    instances_per_gpu: int = Field(default=1, ge=1, le=64)
    # Extra messages reserved per thread. 1 keeps a few messages in hand to overlap broker latency
    # with compute, without hoarding work that an idle worker elsewhere could take.
    prefetch_multiplier: int = Field(default=1, ge=1)

    # Redis redelivers an un-acked message after this many seconds. It must exceed the longest wait
    # + run of a reserved message: (concurrency*prefetch) chunks of 256 generation lines on a CPU
    # take minutes, so 2 h leaves ample margin. The cost: work of a worker killed with -9 comes
    # back only after 2 h (a clean shutdown requeues at once).
    visibility_timeout_s: int = Field(default=7200, ge=60)
    # A worker's heartbeat lives this long; when it lapses (SIGKILL, OOM kill, a lost host) the
    # other workers hand its unacked messages back to the queue (workers/reaper.py), so its work
    # resumes in about this long plus a third of it, not after the visibility timeout.
    lease_ttl_s: float = Field(default=30.0, ge=1.0)
    # A chunk delivered again (an earlier delivery did not finish) runs one line at a time, and a
    # line that was running at two worker deaths fails alone with `worker_crashed` (a poison
    # input). A chunk delivered more than max_attempts + its line count times fails whole: a
    # backstop, so that nothing cycles forever.
    max_attempts: int = Field(default=3, ge=1)

    # Batch results live this long after the batch ends (OpenAI keeps output files 30 days).
    result_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    # Default completion window; work not done by then gets `batch_expired` lines.
    completion_window: str = "24h"

    # Prometheus metrics of each worker on 127.0.0.1:<port + GPU index> (a CPU worker: <port>);
    # 0 turns them off.
    metrics_port: int = Field(default=9808, ge=0, le=65535)

    # Moderation: the policy file (YAML or JSON) for batches submitted without --policy; unset:
    # producers/policies/moderation-default.yaml.
    moderation_policy: Path | None = None
    # Classifier scores are cached in Redis by (model, revision, engine variant, SHA-256 of the
    # text) for this long, so repeated inputs, in one batch or across batches, run once and score
    # identically. 0 turns the cache off. Each entry is ~150 bytes for the default model.
    dedup_ttl_s: int = Field(default=24 * 3600, ge=0)
    # The score cache's own Redis server. Unset: `gristmill up`, when it runs the embedded Redis,
    # starts a second one for the cache, without persistence and capped at dedup_max_memory (the
    # least recently used entries go first), so the cache neither grows into the queues' memory
    # nor takes the queues' server's CPU (docs/moderation.md, "The cache's own server"); with GRISTMILL_REDIS_URL set and this
    # unset, the cache shares that server. Point every worker at the same one.
    dedup_redis_url: str | None = None
    # Memory cap of the embedded cache server, as redis-server reads it (bytes, or 512mb, 2gb).
    dedup_max_memory: str = Field(default="1gb", pattern=r"(?i)^[0-9]+(k|kb|m|mb|g|gb)?$")

    # The HTTP front door (`gristmill serve`; `gristmill up` starts it too): OpenAI's Files and
    # Batches API. Where it listens.
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8000, ge=0, le=65535)
    # Its API keys: comma-separated keys (or `sha256:<hex>` digests of them); admin keys see every
    # key's files and batches; a keys file holds one key or digest a line, optionally followed by
    # `admin` (`gristmill keys new --file F` appends one). With none, a server on loopback makes one
    # key and keeps it in $GRISTMILL_HOME/api-key; on any other address it refuses to start.
    api_keys: SecretStr | None = None
    admin_api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    # Where uploads are kept: a directory every `serve` replica can read (a shared filesystem when
    # several hosts serve; workers never read it). Unset: $GRISTMILL_HOME/files.
    files_dir: Path | None = None
    # The largest upload taken; a larger one gets 413 and nothing of it is kept. Uploads stream to
    # disk, so this guards the disk, not memory (OpenAI's Batch API takes 200 MB).
    max_upload_bytes: int = Field(default=16 << 30, ge=1024)
    # Uploads expire this long after they were made, unless the upload says otherwise
    # (`expires_after`); OpenAI keeps batch input 30 days.
    file_ttl_s: int = Field(default=30 * 86400, ge=3600)
    # Batch ingests (validate and enqueue) one server runs at once.
    serve_ingest_threads: int = Field(default=4, ge=1, le=64)
    # Most lines a batch may have; 0: no cap. OpenAI caps a batch at 50,000 requests; gristmill
    # takes millions, so the cap is off unless an operator wants one.
    max_batch_lines: int = Field(default=0, ge=0)

    # Flower. It always asks for credentials: "user:password" here, else `gristmill up` and
    # `gristmill flower` make a random password and print it (`make demo` runs no Flower).
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    flower_basic_auth: SecretStr | None = None

    @field_validator("flower_basic_auth")
    @classmethod
    def _auth(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            user, sep, password = v.get_secret_value().partition(":")
            if not (user and sep and password):
                raise ConfigurationError("GRISTMILL_FLOWER_BASIC_AUTH must be user:password")
        return v

    def flower_command(self, auth: str | None = None) -> tuple[list[str], str]:
        """(argv, the user:password it asks for). Basic auth on every page and API call: its API
        can revoke tasks and shut workers down. `auth` overrides the setting; with neither, a
        random password for user `gristmill`."""
        import secrets

        from .runtime import python_module
        creds = auth or (self.flower_basic_auth.get_secret_value() if self.flower_basic_auth else None)
        creds = creds or f"gristmill:{secrets.token_urlsafe(12)}"
        return (python_module("celery", "-A", "gristmill.producers.app:app", "flower",
                              f"--address={self.flower_address}", f"--port={self.flower_port}", f"--basic-auth={creds}"), creds)

    @field_validator("completion_window")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_window(v)
        return v

    @model_validator(mode="after")
    def _variant(self) -> "Settings":
        if self.engine_quantize != "none" and self.engine_sparsity != "none":
            raise ConfigurationError(
                f"engine_quantize={self.engine_quantize} and engine_sparsity={self.engine_sparsity} do not "
                "combine: set one of GRISTMILL_ENGINE_QUANTIZE / GRISTMILL_ENGINE_SPARSITY back to 'none'")
        return self

    @cached_property
    def registry(self):
        from .registry import load_registry
        return load_registry(self.models_file, include_defaults=self.builtin_models)

    def policy(self, path: Path | None = None):
        """The moderation policy from `path`, else the configured or shipped default, checked
        against the registry (its model must be a registered classifier) and with the model named
        canonically. None when no policy was asked for and the shipped one's model is not
        registered (GRISTMILL_BUILTIN_MODELS=false): moderation lines then run the url's default
        model under that model's registered thresholds."""
        from .policy import DEFAULT_POLICY_FILE, load_policy
        source = path or self.moderation_policy or DEFAULT_POLICY_FILE
        pol = load_policy(source)
        try:
            return self.checked_policy(pol, f"policy file {source}")
        except PolicyModelNotFound:
            if source == DEFAULT_POLICY_FILE:
                return None
            raise

    def checked_policy(self, pol, where: str = "policy"):
        """`pol` checked against the registry, its model named canonically: the model must be a
        registered classifier (else PolicyModelNotFound) and, where its labels are known without
        loading it, feed every policy label (else ConfigurationError)."""
        from .errors import ModelNotFound
        try:
            spec = self.registry.resolve(C.MODERATIONS_URL, pol.model)
        except ModelNotFound as e:
            raise PolicyModelNotFound(f"{where}: model: {e}") from e
        labels = spec.known_labels()
        if labels is not None:  # else the worker checks, and fails the batch's moderation lines
            try:
                pol.sources(labels)
            except ValueError as e:
                raise ConfigurationError(f"{where}: labels: {e}") from e
        return pol.model_copy(update={"model": spec.name})

    def load_api_keys(self):
        from .apikeys import ApiKeys
        secret = lambda v: v.get_secret_value() if v is not None else None  # noqa: E731
        return ApiKeys.from_sources(secret(self.api_keys), secret(self.admin_api_keys), self.api_keys_file)

    @property
    def files_path(self) -> Path:
        return self.files_dir or self.home / "files"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def dedup_redis_dir(self) -> Path:
        return self.home / "redis-cache"

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"


class PolicyModelNotFound(ConfigurationError):
    """Raised when a policy names a model that is not a registered classifier."""


def parse_window(v: str) -> int:
    """'24h' / '30m' / '3600s' / '2d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        n, unit = float(v[:-1]), v[-1]
        seconds = int(n * units[unit])
    except (ValueError, KeyError, IndexError):
        raise ConfigurationError(f"completion window {v!r}: write a number and a unit, e.g. '24h', '30m', '90s'")
    if seconds <= 0:
        raise ConfigurationError(f"completion window {v!r} must be positive")
    return seconds
