"""gristmill workers: Celery tasks, the micro-batcher, the per-process engine host, GPU pinning,
and the launcher. Start them with `gristmill worker` or `gristmill up`."""
