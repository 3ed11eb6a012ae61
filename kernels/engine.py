"""What every engine offers a worker: the contract between workers/ and the engines in kernels/.

A worker's engine host loads engines, hands them batches from the micro-batcher's engine thread and
reads their results; it relies on nothing else. Two kinds:

- `Classifier`: texts in, one score per label out (torch, ONNX Runtime, a cascade of the two).
  `encode` tokenizes a batch of texts in one call; `run` scores a batch of token-id lists.
- `Generator`: prompts in, completions out, streaming: `run` takes requests and, on the
  continuous loop, pulls more as rows free up (`more`) and reports each one as it ends (`on_done`).

Both are `typing.Protocol`s checked at load (`check_engine`): an engine is any object with these
members, so a new backend needs no base class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    """Members every engine has."""

    variant: str  # what runs, e.g. "torch-bfloat16-cuda", "ort-int8-cpu"; in every output's provenance
    revision: str  # a digest of the weights (and head); with the variant, the score cache's namespace
    labels: list[str]  # a classifier's output labels; empty for a generator

    def encode(self, texts: Sequence[str]) -> list[Any]:
        """Tokenize texts in one call: a classifier's token ids, a generator's prompt ids."""
        ...

    def run(self, payloads: list[Any]) -> list[Any]:
        """One result per payload, in order. Called from the engine thread only."""
        ...

    def check_health(self) -> bool:
        """True while the engine can serve (a small forward pass where that is cheap)."""
        ...

    def shutdown(self) -> None:
        """Free the device memory the engine holds; it is not used again."""
        ...


@runtime_checkable
class Classifier(Engine, Protocol):
    """Scores texts: `run(ids) -> [{label: score}]`."""

    score_fields: list[str]  # the keys of each result: the labels (a cascade adds whether it escalated)


@runtime_checkable
class Generator(Engine, Protocol):
    """Generates completions, streaming on the continuous loop."""

    loop: Any  # the continuous-batching loop, or None where requests run as static batches

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def budget(self, prompt_len: int, max_tokens: int) -> int:
        """New tokens a request may generate (raises PromptTooLong where none fit)."""
        ...

    def run(self, payloads: list[Any], more: Callable[..., Any] | None = None,  # type: ignore[override]
            on_done: Callable[..., Any] | None = None) -> list[Any]: ...


def check_engine(engine: object, generator: bool) -> Engine:
    """`engine`, after checking it offers what a worker calls; a TypeError names what it lacks."""
    want = Generator if generator else Classifier
    if not isinstance(engine, want):
        members: set[str] = set()
        for cls in want.__mro__:
            if cls in (Engine, Classifier, Generator):
                members |= set(cls.__dict__.get("__annotations__", {}))
                members |= {k for k, v in cls.__dict__.items() if callable(v) and not k.startswith("_")}
        lacks = sorted(m for m in members if not hasattr(engine, m))
        raise TypeError(f"{type(engine).__name__} is not a {want.__name__} engine: it lacks {', '.join(lacks)}")
    return engine  # type: ignore[return-value]
