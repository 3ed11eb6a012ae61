"""Every Redis key, queue and task name gristmill uses, in one place (as rq/defaults.py does)."""

from __future__ import annotations

PREFIX = "gristmill"
# The name Redis Sentinel knows the primary by unless GRISTMILL_REDIS_MASTER_NAME says otherwise
# (Sentinel's conventional one).
REDIS_MASTER_NAME = "mymaster"

# Celery: one queue per task kind, so a host can run generation and classification workers apart.
GENERATE_QUEUE = "gristmill.generate"
CLASSIFY_QUEUE = "gristmill.classify"
GENERATE_TASK = "gristmill.generate"
CLASSIFY_TASK = "gristmill.classify"
QUEUES = (GENERATE_QUEUE, CLASSIFY_QUEUE)

# Request urls accepted in input lines (OpenAI Batch format) and the queue each one goes to.
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
MODERATIONS_URL = "/v1/moderations"
CLASSIFICATIONS_URL = "/v1/classifications"
URL_QUEUE = {
    CHAT_URL: GENERATE_QUEUE,
    COMPLETIONS_URL: GENERATE_QUEUE,
    MODERATIONS_URL: CLASSIFY_QUEUE,
    CLASSIFICATIONS_URL: CLASSIFY_QUEUE,
}
QUEUE_TASK = {GENERATE_QUEUE: GENERATE_TASK, CLASSIFY_QUEUE: CLASSIFY_TASK}

# Batch lifecycle, in OpenAI's words.
VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
TERMINAL = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})

# Error codes written into error-file lines.
E_INVALID_JSON = "invalid_json"
E_MISSING_CUSTOM_ID = "missing_custom_id"
E_INVALID_METHOD = "invalid_method"
E_INVALID_URL = "invalid_url"
E_INVALID_BODY = "invalid_body"
E_MODEL_NOT_FOUND = "model_not_found"
E_CONTEXT_LENGTH = "context_length_exceeded"
E_ENGINE = "engine_error"
E_EXPIRED = "batch_expired"
E_WORKER_CRASHED = "worker_crashed"


def batch_key(batch_id: str) -> str:
    """Hash: status, counts, timestamps, metadata of one batch."""
    return f"{PREFIX}:batch:{batch_id}"


def results_key(batch_id: str) -> str:
    """Hash: custom_id (or '#<line>' when the line has none) -> tagged output or error line."""
    return f"{PREFIX}:batch:{batch_id}:results"


def ids_key(batch_id: str) -> str:
    """Set: custom_ids seen while validating (duplicate detection without client memory); it goes
    when validation ends."""
    return f"{PREFIX}:batch:{batch_id}:ids"


def chunks_done_key(batch_id: str) -> str:
    """Set: indexes of chunk messages whose items are all written (or skipped on cancel)."""
    return f"{PREFIX}:batch:{batch_id}:chunks"


def attempts_key(batch_id: str) -> str:
    """Hash: chunk index -> deliveries seen, for the requeue cap."""
    return f"{PREFIX}:batch:{batch_id}:attempts"


def dedup_key(model_key: str, sha256: str) -> str:
    """String: one classifier input's packed scores (workers/dedup.py), expiring after DEDUP_TTL_S."""
    return f"{PREFIX}:dedup:{model_key}:{sha256[:32]}"


def kept_key(batch_id: str, chunk: int) -> str:
    """Hash: line number -> [line, is_error], the lines of a chunk re-run one item at a time."""
    return f"{PREFIX}:batch:{batch_id}:kept:{chunk}"


def suspects_key(batch_id: str, chunk: int) -> str:
    """Hash: line number -> worker deaths while it ran alone (poison detection)."""
    return f"{PREFIX}:batch:{batch_id}:suspects:{chunk}"


def pending_key(batch_id: str) -> str:
    """Hash: chunk index -> its message (compressed), from ingest until its lines are written, so a
    message lost between kombu's take and its record can be sent again (workers/reaper.py)."""
    return f"{PREFIX}:batch:{batch_id}:pending"


def pending_at_key(batch_id: str) -> str:
    """Sorted set: each pending chunk, scored by when it was last sent (the sweep's ordering test)."""
    return f"{PREFIX}:batch:{batch_id}:pending-at"


def chunk_task_id(batch_id: str, chunk: int) -> str:
    """A chunk message's Celery task id: the same for every sending of it, and readable from the
    message's headers without decoding its body."""
    return f"{batch_id}.c{chunk}"


def chunk_of_task_id(task_id: str) -> tuple[str, int] | None:
    batch_id, sep, chunk = task_id.rpartition(".c")
    return (batch_id, int(chunk)) if sep and chunk.isdigit() else None


# Set: batches whose ingest has ended and that may still hold pending chunks: the sweep's work list.
SWEEP_KEY = f"{PREFIX}:sweep"

# Hash: kombu delivery tag -> the worker process holding it (workers/reaper.py).
OWNERS_KEY = f"{PREFIX}:owners"


# Sorted set: "<worker id>|<queue>,<queue>" scored by when that worker's heartbeat lapses, so
# producers can tell whether anything consumes a batch's queues.
WORKERS_KEY = f"{PREFIX}:workers"


def serving_key(worker_id: str) -> str:
    """Hash with a TTL, renewed with the heartbeat: model -> the variant a worker process serves
    and why (workers/variants.py), for `gristmill models`."""
    return f"{PREFIX}:serving:{worker_id}"


def alive_key(worker_id: str) -> str:
    """String with a TTL: a worker process's heartbeat; gone = its deliveries go back to the queue."""
    return f"{PREFIX}:alive:{worker_id}"


BATCH_INDEX = f"{PREFIX}:batches"  # sorted set: batch id scored by created_at

# Sorted sets whose scores are all 0, read in id order (ids embed their creation time): every
# batch, and each API key's own batches and files, for the HTTP API's cursor pages.
BATCHES_BY_ID = f"{PREFIX}:batches:by-id"
FILES_INDEX = f"{PREFIX}:files:by-id"
# Sorted set: uploaded file id scored by its expires_at, for the expiry sweep.
FILES_EXPIRY = f"{PREFIX}:files:expiry"


def batches_index_key(owner: str) -> str:
    return f"{PREFIX}:owner:{owner}:batches"


def files_index_key(owner: str) -> str:
    return f"{PREFIX}:owner:{owner}:files"


def file_key(file_id: str) -> str:
    """Hash: one file's record (files.StoredFile); an upload's bytes are on disk, not here."""
    return f"{PREFIX}:file:{file_id}"


def idempotency_key(owner: str, key_digest: str) -> str:
    """String with a TTL: the batch an Idempotency-Key of this owner created ('pending' meanwhile)."""
    return f"{PREFIX}:idem:{owner}:{key_digest}"


# Set: batches whose ingest has not ended (validating, or in progress with chunks still to send).
INGESTS_KEY = f"{PREFIX}:ingests"


def ingest_lease_key(batch_id: str) -> str:
    """String with a TTL, renewed while a process ingests the batch: gone = that process died, and
    a `gristmill serve` takes the ingest over (producers/client.py, resume_ingests)."""
    return f"{PREFIX}:ingest-lease:{batch_id}"


def batch_keys(batch_id: str) -> list[str]:
    return [batch_key(batch_id), results_key(batch_id), ids_key(batch_id),
            chunks_done_key(batch_id), attempts_key(batch_id), pending_key(batch_id),
            pending_at_key(batch_id)]
