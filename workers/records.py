"""The named records between a worker's stages: a chunk's prepared items, its output lines, its
outcome. Stages: prepare (workers/host.py) -> batcher and engine -> settle -> format -> write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..producers import schemas as S
from ..producers.batches import ChunkCounts


@dataclass
class ClassifierInputs:
    """A classifier item's inputs as columns, one entry per input text."""
    model_key: str  # the score-cache namespace of the item's model (workers/dedup.py)
    sha256: list[str]  # each input's SHA-256, the score cache's key and the provenance's
    # the scores the score cache answered, where it did (that input then has no payload)
    known: list[dict[str, float] | None]
    # answered without running it here: the cache, a repeat within the chunk, another chunk's run
    reused: list[bool]


@dataclass
class Prepared:
    """One item made ready for the batcher: per input, the engine's payload (token ids, or a
    generation request) and its token cost. A classifier input the score cache answered, or
    that repeats an earlier input of the chunk, has no payload (None): it shares that result."""
    item: S.WorkItem
    payloads: list[Any]
    costs: list[int]
    inputs: ClassifierInputs | None = None  # classifiers only


class Repeat(NamedTuple):
    """An input that repeats an earlier input of its chunk (same model, same text): it shares
    that input's result."""
    model_key: str
    sha256: str


class OutputLine(NamedTuple):
    """One line of a chunk's results: an output line, or an error line (`is_error`)."""
    body: dict[str, Any]
    is_error: bool


@dataclass
class ChunkOutcome:
    """What running a chunk's items gave: its lines, the model of each line, and the classifier
    counters (score-cache reuse, cascade escalations) they add to the batch."""
    lines: list[OutputLine] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # models[i]: the model of lines[i]
    counts: ChunkCounts = field(default_factory=ChunkCounts)

    def add(self, line: dict[str, Any], is_error: bool, model: str) -> None:
        self.lines.append(OutputLine(line, is_error))
        self.models.append(model)

    def extend(self, other: "ChunkOutcome") -> None:
        self.lines += other.lines
        self.models += other.models
        self.counts = self.counts + other.counts

    @property
    def failed(self) -> int:
        return sum(1 for line in self.lines if line.is_error)
