"""The contract: input line schemas (OpenAI Batch format), line validation, output/error lines.

Pure functions of their inputs: no Redis, no torch. Workers build their output lines with these.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import constants as C
from .errors import ModelNotFound
from .policy import Policy, is_openai_moderation_model
from .registry import MODERATION_CATEGORIES, Registry


class _Body(BaseModel):
    # Unknown OpenAI parameters are accepted and ignored (files written for OpenAI carry many),
    # except those whose meaning we cannot honour, which are rejected below.
    model_config = ConfigDict(extra="allow")
    model: str | None = None


def _number(v: Any) -> float | None:
    return v if type(v) in (int, float) else None  # not a bool: True is not 1 here


def _off(v: Any) -> bool:
    return v is None or v is False


def _zero(v: Any) -> bool:
    return v is None or _number(v) == 0


# Sampling-time and output features the decode loop does not implement, each with the test that a
# value is its default (null, false, zero or empty), the only values accepted.
_UNHONOURED: dict[str, Callable[[Any], bool]] = {
    "logprobs": _off, "echo": _off, "top_logprobs": _zero, "presence_penalty": _zero, "frequency_penalty": _zero,
    "best_of": lambda v: v is None or _number(v) == 1,
    "logit_bias": lambda v: v is None or v == {},
    "tools": lambda v: v is None or v == [],
    "functions": lambda v: v is None or v == [],
    "suffix": lambda v: v is None or v == "",
}


class _Sampling(_Body):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # the range a torch generator's seed takes (a signed or unsigned 64-bit integer)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.stream:
            raise ValueError("stream: batch requests cannot stream")
        # OpenAI parameters whose non-default values would change the answer or its shape, which
        # this engine cannot honour: a line asking for them fails rather than being answered as if
        # it had not (their default values, which files written for OpenAI often carry, pass)
        extra = self.model_extra or {}
        for name, is_default in _UNHONOURED.items():
            if name in extra and not is_default(extra[name]):
                raise ValueError(f"{name}: not supported here (got {extra[name]!r}); drop it or give its default")
        fmt = extra.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type", "text") == "text"):
            raise ValueError(f"response_format: only {{'type': 'text'}} is supported (got {fmt!r})")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("prompt: give one string (a list of prompts is not supported in a batch line)")
            return v[0]
        return v


def as_inputs(value: str | list[str]) -> list[str]:
    """A classification `input` (one string or a list of them) as a list."""
    return [value] if isinstance(value, str) else list(value)


# Inputs in one classification line. Each becomes a row of a device batch; a list this long is
# already 8 batches of the default size.
MAX_INPUTS_PER_LINE = 2048


class ClassifyBody(_Body):
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input: give a string or a non-empty list of strings")
        if isinstance(v, list) and len(v) > MAX_INPUTS_PER_LINE:
            raise ValueError(f"input: {len(v)} strings; at most {MAX_INPUTS_PER_LINE} per line (split the line)")
        return v

    def inputs(self) -> list[str]:
        return as_inputs(self.input)


BODY_SCHEMA: dict[str, type[_Body]] = {
    C.CHAT_URL: ChatBody,
    C.COMPLETIONS_URL: CompletionBody,
    C.MODERATIONS_URL: ClassifyBody,
    C.CLASSIFICATIONS_URL: ClassifyBody,
}


@dataclass(frozen=True)
class LineError:
    """A line that will not run: becomes one error-file line."""
    line: int
    custom_id: str | None
    code: str
    message: str


class WorkItem(NamedTuple):
    """A validated line, as it travels in a Celery message (see `to_message`). A named tuple, not
    a frozen dataclass: a worker builds one per item from each message, at 0.6 us against 1.6."""
    line: int
    custom_id: str
    url: str
    model: str
    body: dict[str, Any]
    input_sha256: str

    def to_message(self) -> dict[str, Any]:
        return {"line": self.line, "custom_id": self.custom_id, "url": self.url, "model": self.model,
                "body": self.body, "sha": self.input_sha256}

    @classmethod
    def from_message(cls, m: dict[str, Any]) -> "WorkItem":
        return cls(m["line"], m["custom_id"], m["url"], m["model"], m["body"], m["sha"])


def _pydantic_message(e: ValidationError) -> str:
    """Up to three body errors, each as `body.field: what is wrong`. Our own validators' messages
    (pydantic's "Value error, ...") already start with the field they name, which is not repeated."""
    parts = []
    for err in e.errors()[:3]:
        loc = [str(x) for x in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if loc and msg.startswith(f"{loc[-1]}:"):
            loc = loc[:-1]
        if loc:
            parts.append(f"body.{'.'.join(loc)}: {msg}")
        else:  # a model-level check: its message names the field, else it is about the whole body
            parts.append(f"body.{msg}" if ":" in msg else f"body: {msg}")
    return "; ".join(parts)


def loads_line(raw: bytes | str) -> Any:
    """One input line parsed as the standard library parses it, by orjson where that gives the same
    value (a 700-byte line: ~0.8 us to parse and ~1-2 to check, against ~6 us). The rest goes to the standard library, which
    accepts it as before or raises its own error: what orjson refuses (NaN and Infinity, lone
    surrogates, UTF-16 text, invalid JSON), and any line where orjson read a float of 2**63 or
    more, since orjson reads integers beyond 64 bits as floats (a changed value, not an error).
    Nesting too deep for the standard library is a ValueError too, not a RecursionError."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    else:
        if not _has_huge_float(obj):
            return obj
    try:
        return json.loads(raw)
    except RecursionError:  # not a ValueError: it would have failed the whole file, not the line
        raise ValueError("arrays or objects nested too deeply") from None


def _has_huge_float(obj: Any) -> bool:
    """Whether a parsed value holds a float of magnitude 2**63 or more (iterative: orjson parses
    nesting deeper than Python's recursion limit)."""
    stack = [obj]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
        elif t is float and not -9.2e18 < v < 9.2e18:
            return True
    return False


def _lone_surrogate(raw: bytes | str, obj: Any) -> bool:
    """Whether a parsed line holds a lone UTF-16 surrogate: JSON lets `\\ud800` through, but UTF-8
    cannot encode it, so neither Redis, nor SHA-256, nor the output files could take the line. Only
    lines that could hold one (a `\\u` escape, or a str with non-ASCII text) are checked in full."""
    if isinstance(raw, bytes):
        maybe = b"\\u" in raw  # parsed bytes are valid UTF-8, which holds no surrogate: only an escape makes one
    else:
        maybe = "\\u" in raw or not raw.isascii()
    if not maybe:
        return False
    try:
        orjson.dumps(obj)  # refuses lone surrogates, and integers beyond 64 bits
        return False
    except TypeError:
        pass
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def peek_custom_id(raw: bytes | str) -> str | None:
    """The line's custom_id if it is JSON with a string custom_id, for duplicate detection.
    orjson's value is taken without `loads_line`'s check for big integers read as floats: that
    changes numbers only, never a string (a hypothesis test compares with the standard library)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            obj = loads_line(raw)
        except ValueError:
            return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(cid, str) or not cid:
        return None
    try:
        cid.isascii() or cid.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: pass 2 reports the line
        return None
    return cid


def validate_line(raw: bytes | str, line_no: int, registry: Registry,
                  policy: "Policy | None" = None, max_bytes: int | None = None,
                  endpoint: str | None = None) -> Union[WorkItem, LineError]:
    """One input line -> a WorkItem to run, or the LineError its error-file line reports.
    Moderation lines run the model of the batch's `policy` (see `moderation_model`); a line over
    `max_bytes` is refused before it is parsed. A batch created for one `endpoint` (the HTTP API's
    batches) refuses lines for another url, as OpenAI's does."""
    if max_bytes is not None and len(raw) > max_bytes:
        return LineError(line_no, peek_custom_id(raw), C.E_INVALID_BODY, f"line is {len(raw):,} bytes; the limit is {max_bytes:,} "
                         f"(GRISTMILL_MAX_LINE_BYTES)")
    try:
        obj = loads_line(raw)
    except ValueError as e:
        return LineError(line_no, None, C.E_INVALID_JSON, f"line is not valid JSON: {e}")
    if _lone_surrogate(raw, obj):
        return LineError(line_no, None, C.E_INVALID_JSON, "line holds a lone UTF-16 surrogate escape (such as "
                         "\\ud800 without its pair), which is not a Unicode character")
    if not isinstance(obj, dict):
        return LineError(line_no, None, C.E_INVALID_JSON, "line must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError(line_no, None, C.E_MISSING_CUSTOM_ID, "custom_id: a non-empty string is required")
    method = obj.get("method", "POST")
    if method != "POST":
        return LineError(line_no, cid, C.E_INVALID_METHOD, f"method: must be 'POST', got {method!r}")
    url = obj.get("url")
    if url not in BODY_SCHEMA:
        return LineError(line_no, cid, C.E_INVALID_URL,
                         f"url: {url!r} is not supported; use one of {', '.join(BODY_SCHEMA)}")
    if endpoint is not None and url != endpoint:
        return LineError(line_no, cid, C.E_INVALID_URL, f"url: {url!r} differs from the batch's endpoint {endpoint!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(line_no, cid, C.E_INVALID_BODY, "body: a JSON object is required")
    try:
        parsed = BODY_SCHEMA[url].model_validate(body)
    except ValidationError as e:
        return LineError(line_no, cid, C.E_INVALID_BODY, _pydantic_message(e))
    try:
        if url == C.MODERATIONS_URL and policy is not None:
            spec = moderation_model(registry, policy, parsed.model)
        else:
            spec = registry.resolve(url, parsed.model)
    except ModelNotFound as e:
        return LineError(line_no, cid, C.E_MODEL_NOT_FOUND, str(e))
    except ValueError as e:
        return LineError(line_no, cid, C.E_INVALID_BODY, str(e))
    if url in (C.MODERATIONS_URL, C.CLASSIFICATIONS_URL):
        sha = ""  # per input text, by the worker (provenance.input_sha256 and the dedup key)
    else:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        sha = hashlib.sha256(canonical.encode()).hexdigest()
    return WorkItem(line_no, cid, url, spec.name, parsed.model_dump(mode="json", exclude_none=True), sha)


def moderation_model(registry: Registry, policy: "Policy", model: str | None):
    """The spec a moderation line runs: the policy's model, when the line names none, names one of
    OpenAI's moderation models, or names the policy's model itself. Naming any other model is an
    error (ValueError), not a silent swap: the policy's labels and thresholds belong to its model."""
    spec = registry.resolve(C.MODERATIONS_URL, policy.model)
    if model is None or is_openai_moderation_model(model) or registry.resolve(C.MODERATIONS_URL, model) is spec:
        return spec
    raise ValueError(f"body.model: {model!r} is not the model of this batch's moderation policy "
                     f"{policy.policy_version!r} ({spec.name}); drop `model` or submit with a policy for it")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---- output lines -------------------------------------------------------------------------------

# Response ids: a random per-process prefix and a counter (unique across processes with
# overwhelming probability, and ~10x cheaper than a uuid4 per id at tens of thousands of lines/s).
_RID_PREFIX = uuid.uuid4().hex[:12]
_RID_COUNTER = itertools.count()


def _reseed() -> None:
    global _RID_PREFIX, _RID_COUNTER
    _RID_PREFIX, _RID_COUNTER = uuid.uuid4().hex[:12], itertools.count()


os.register_at_fork(after_in_child=_reseed)


def _rid(prefix: str) -> str:
    return f"{prefix}{_RID_PREFIX}{next(_RID_COUNTER):012x}"


def provenance(model: str, revision: str, variant: str, sha: str | list[str],
               policy: Policy | None = None, decided_by: str | list[str] | None = None) -> dict[str, Any]:
    """What produced a line. Classifier lines add the policy's version and thresholds digest, and
    their input_sha256 is the SHA-256 of the UTF-8 input text (a list of them for a list input);
    generation lines hash the request body in canonical JSON. A cascade's lines say which of its
    models decided each input (`decided_by`: "student", "middle" in a three-stage cascade, or "full";
    a list for a list input)."""
    out: dict[str, Any] = {"model": model, "model_revision": revision, "engine_variant": variant}
    if policy is not None:
        out.update(policy_version=policy.policy_version, thresholds_digest=policy.thresholds_digest)
    out["input_sha256"] = sha
    if decided_by is not None:
        out["decided_by"] = decided_by
    return out


def output_line(custom_id: str, body: dict[str, Any], prov: dict[str, str]) -> dict[str, Any]:
    return {"id": _rid("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": _rid("req_"), "body": body},
            "error": None, "provenance": prov}


def error_line(custom_id: str | None, code: str, message: str, line: int) -> dict[str, Any]:
    return {"id": _rid("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "line": line}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_body(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              fingerprint: str) -> dict[str, Any]:
    return {"id": _rid("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": fingerprint}


def completion_body(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                    fingerprint: str) -> dict[str, Any]:
    return {"id": _rid("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": fingerprint}


def moderation_body(model: str, scores: list[dict[str, float]], thresholds: dict[str, float],
                    policy_version: str) -> dict[str, Any]:
    """`scores` by policy label. OpenAI categories the policy does not score are reported unflagged
    at 0, so that every body parses as openai's ModerationCreateResponse."""
    results = []
    for s in scores:
        s = {**_UNSCORED, **s}
        cats = dict.fromkeys(s, False)
        flagged = False
        for k, t in thresholds.items():
            v = s.get(k)
            if v is not None and v >= t:
                cats[k] = flagged = True
        results.append({"flagged": flagged, "categories": cats,
                        "category_scores": dict(zip(s, map(float, s.values()))),
                        # one list for all of a result's keys: a line is read-only once built
                        "category_applied_input_types": dict.fromkeys(s, ["text"]),
                        "policy_version": policy_version})
    return {"id": _rid("modr-"), "model": model, "results": results}


_UNSCORED = dict.fromkeys(MODERATION_CATEGORIES, 0.0)


def classification_body(model: str, scores: list[dict[str, float]], thresholds: dict[str, float],
                        policy_version: str) -> dict[str, Any]:
    results = []
    for s in scores:
        top = max(s, key=s.get)
        flagged = sorted(k for k, v in s.items() if v >= thresholds[k])
        results.append({"label": top, "score": float(s[top]), "flagged": bool(flagged),
                        "flagged_labels": flagged, "scores": {k: float(v) for k, v in s.items()},
                        "thresholds": dict(thresholds), "policy_version": policy_version})
    return {"id": _rid("clf-"), "object": "classification", "model": model, "results": results}
