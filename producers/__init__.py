"""gristmill producers: the contract (schemas, settings, queues) and the front door (Client, CLI).

Importing this package never imports torch or transformers.
"""

from .batches import Batch, RequestCounts
from .client import Client
from .errors import GristmillError
from .settings import Settings

__all__ = ["Batch", "Client", "GristmillError", "RequestCounts", "Settings"]
