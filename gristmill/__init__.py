"""gristmill: bulk offline inference over Redis and Celery.

    from gristmill import Client
    c = Client()                          # GRISTMILL_REDIS_URL, or the running `gristmill up`
    b = c.submit_file("jobs.jsonl")

One import namespace. The repository keeps the code in three top-level folders, `producers/`
(the contract and the front door), `workers/` (Celery tasks, batcher, engine host) and `kernels/`
(models and engines); they are `gristmill.producers`, `gristmill.workers` and `gristmill.kernels`.
A built wheel holds them under `gristmill/` (setuptools' package-dir mapping). In a source checkout
(an editable install, or the repository on sys.path) this package's search path also takes in the
repository root, where the folders are. They have no `__init__.py`: a folder named `kernels` in the
working directory (sys.path[0] for `python -m`, `python -c` and pytest) is then only a namespace
portion, which loses to any installed package of that name, such as Hugging Face's `kernels` that
transformers imports; with an `__init__.py` it would shadow that package and break every model
load.

Importing `gristmill` stays light: the public names load on first use, and `gristmill.kernels`
never pulls in Redis or Celery.
"""

from __future__ import annotations

from pathlib import Path as _Path
from typing import TYPE_CHECKING


def _checkout_root() -> list[str]:
    """The repository root, when this file is the source checkout's (its subpackages are not beside
    it but one level up, beside pyproject.toml); else nothing."""
    here = _Path(__file__).resolve().parent
    root = here.parent
    if not (here / "producers").is_dir() and (root / "pyproject.toml").is_file() \
            and (root / "producers" / "schemas.py").is_file():
        return [str(root)]
    return []


__path__ += _checkout_root()  # noqa: F821  (a regular package's __path__ is a list)

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "gristmill.producers.client",
    "Batch": "gristmill.producers.batches",
    "RequestCounts": "gristmill.producers.batches",
    "Settings": "gristmill.producers.settings",
    "Policy": "gristmill.producers.policy",
    "GristmillError": "gristmill.producers.errors",
    "ConfigurationError": "gristmill.producers.errors",
    "SubmissionRejected": "gristmill.producers.errors",
    "DuplicateCustomIds": "gristmill.producers.errors",
    "BatchNotFound": "gristmill.producers.errors",
    "ModelNotFound": "gristmill.producers.errors",
    "RedisUnavailable": "gristmill.producers.errors",
}
__all__ = ["Batch", "BatchNotFound", "Client", "ConfigurationError", "DuplicateCustomIds", "GristmillError",
           "ModelNotFound", "Policy", "RedisUnavailable", "RequestCounts", "Settings", "SubmissionRejected"]

if TYPE_CHECKING:
    from .producers.batches import Batch, RequestCounts
    from .producers.client import Client
    from .producers.errors import (BatchNotFound, ConfigurationError, DuplicateCustomIds, GristmillError,
                                   ModelNotFound, RedisUnavailable, SubmissionRejected)
    from .producers.policy import Policy
    from .producers.settings import Settings


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gristmill' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
