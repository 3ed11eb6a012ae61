"""The generation engine: a batch of prompts with per-row sampling parameters, KV-cached.

Hugging Face `generate` takes one GenerationConfig per call; bulk files mix temperatures, top_p,
seeds, stops and max_tokens line by line. This engine runs them together and gives each row its own
parameters, its own seeded generator and its own stop condition. Llama-family models run the
continuous-batching loop of kernels/decode.py (a finished row frees its slot for the next
request); other architectures run a static left-padded loop over Hugging Face's cache.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .decode import ContinuousLoop, supports
from .loading import default_dtype, load_causal_lm, resolve_device


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenResult:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the new tokens (eos excluded)


class PromptTooLong(ValueError):
    """Raised when a prompt leaves no room for even one new token in the model's context."""


class EmptyPrompt(ValueError):
    """Raised when a prompt has no tokens and the model has no BOS token to begin from."""


def sample_tokens(logits: torch.Tensor, temperature: list[float], top_p: list[float],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row, left on logits' device: nothing is read back, so a decode loop can queue
    the next step behind it. temperature 0 -> greedy. Other rows draw from their nucleus (the
    smallest prefix of the sorted distribution whose mass reaches top_p): a row with a generator
    (a seeded request) draws with it, row by row, so its tokens do not depend on its batch; the
    others draw together, as the argmax of p / E with E ~ Exp(1) per token (an exact sample of p)."""
    out = logits.argmax(dim=-1)
    sampled = [j for j, t in enumerate(temperature) if t > 0]
    if not sampled:
        return out
    dev = logits.device
    rows = torch.tensor(sampled, device=dev)
    temp = torch.tensor([temperature[j] for j in sampled], device=dev, dtype=torch.float32)
    mass = torch.tensor([top_p[j] for j in sampled], device=dev, dtype=torch.float32)
    probs = torch.softmax(logits[rows].float() / temp.unsqueeze(1), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    sorted_p = sorted_p.masked_fill((cum - sorted_p) >= mass.unsqueeze(1), 0.0)
    picks = torch.empty(len(sampled), dtype=torch.long, device=dev)
    free = [k for k, j in enumerate(sampled) if generators[j] is None]
    if free:
        f = torch.tensor(free, device=dev)
        nucleus = sorted_p[f]
        picks[f] = (nucleus / torch.empty_like(nucleus).exponential_()).argmax(dim=-1)
    for k, j in enumerate(sampled):
        if generators[j] is not None:
            picks[k] = torch.multinomial(sorted_p[k], 1, generator=generators[j])[0]
    out[rows] = order.gather(1, picks.unsqueeze(1)).squeeze(1)
    return out


class GenerationEngine:
    """load (constructor) / encode_chat / encode_prompt / run / check_health / shutdown."""

    def __init__(self, path: Path, *, cache_dir: Path, device: str = "cpu", max_context: int = 2048,
                 dtype: torch.dtype | None = None, max_slots: int | None = None, continuous: bool = True,
                 cuda_graphs: bool = True, compile_decode: bool = True):
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.model, self.tokenizer, self.revision = load_causal_lm(path, cache_dir, self.device, self.dtype)
        cfg = self.model.config
        self.max_context = min(max_context, getattr(cfg, "max_position_embeddings", max_context))
        eos = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            eos.update(src if isinstance(src, list) else [src] if src is not None else [])
        self.eos_ids = eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(eos), 0)
        # the written forms of the control tokens, which message text must not turn into tokens
        controls = sorted({t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special and t.content},
                          key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, controls))) if controls else None
        # what an empty prompt starts from, as in Hugging Face `generate` called without input ids
        bos = self.tokenizer.bos_token_id
        self.bos_id = bos if bos is not None else getattr(self.model.generation_config, "bos_token_id", None)
        # Slots of the continuous loop: requests decoding at once. A CPU's step time grows with the
        # batch, a GPU's barely does until hundreds of rows.
        slots = max_slots or (256 if self.device.type == "cuda" else 64)
        self.loop = None
        if continuous and supports(self.model):
            # compiling pays on a GPU, where a one-token step is dozens of small kernels per layer
            self.loop = ContinuousLoop(self.model, max_slots=slots, cuda_graphs=cuda_graphs,
                                       compile_decode=compile_decode and self.device.type == "cuda")
        graphs = self.loop is not None and cuda_graphs and self.device.type == "cuda"
        kind = ("continuous+cudagraphs" if graphs else "continuous") if self.loop else "static"
        if self.loop is not None and self.loop.stepper.compiled is not None:
            kind += "+compiled"
        self.variant = f"torch-{str(self.dtype).removeprefix('torch.')}-{self.device.type}-{kind}"

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template's ids. Message text is text: a message holding the written form of a
        control token (`<|im_end|>`, `<|im_start|>system`) gets those characters, not the token, so
        it cannot end its turn or open another (`_encode_chat_as_text`)."""
        if self._control_re is not None and any(self._control_re.search(m["content"]) for m in messages):
            return self._encode_chat_as_text(messages)
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def _encode_chat_as_text(self, messages: list[dict[str, str]]) -> list[int]:
        """Each control-token text in the messages is swapped for a placeholder, the template is
        rendered and tokenized as usual around the placeholders (its own control tokens parsed,
        message text beside them merged as before), and each placeholder becomes the ids of its
        text read as plain characters."""
        found: list[str] = []
        nonce = uuid.uuid4().hex[:12]  # placeholders no message text can spell by chance or on purpose

        def mark(m: re.Match) -> str:
            found.append(m.group(0))
            return f"\ue000{nonce}:{len(found) - 1}\ue001"

        masked = [{**m, "content": self._control_re.sub(mark, m["content"])} for m in messages]  # type: ignore[union-attr]
        rendered = self.tokenizer.apply_chat_template(masked, add_generation_prompt=True, tokenize=False)
        placeholder = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        ids: list[int] = []
        for piece in re.split(f"(\ue000{nonce}:\\d+\ue001)", rendered):
            k = placeholder.fullmatch(piece)
            if k:
                ids += self.tokenizer(found[int(k[1])], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    labels: list[str] = []  # a generator has none (kernels/engine.py's contract)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Prompt ids of plain-text prompts (kernels/engine.py's contract)."""
        return [self.encode_prompt(t) for t in texts]

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's ids; a prompt with none (\"\" through a tokenizer that adds no BOS) starts
        from the model's BOS token. EmptyPrompt when the model has none."""
        ids = self.tokenizer(prompt)["input_ids"]
        if ids:
            return ids
        if self.bos_id is None:
            raise EmptyPrompt("prompt: the prompt has no tokens and this model has no BOS token to start from")
        return [self.bos_id]

    def budget(self, prompt_len: int, max_tokens: int) -> int:
        """max_tokens clipped to the context; PromptTooLong if no room is left."""
        room = self.max_context - prompt_len
        if room < 1:
            raise PromptTooLong(f"prompt is {prompt_len} tokens; this model's context is {self.max_context} "
                                f"tokens, leaving no room to generate")
        return min(max_tokens, room)

    def _generators(self, reqs: list[GenRequest]) -> list[torch.Generator | None]:
        """A seeded generator per seeded request; None for the others, which draw together."""
        gens: list[torch.Generator | None] = []
        for r in reqs:
            g = None
            if r.seed is not None and r.temperature > 0:
                g = torch.Generator(device=self.device)
                g.manual_seed(r.seed)
            gens.append(g)
        return gens

    @torch.inference_mode()
    def run(self, reqs: list[GenRequest], more=None, on_done=None) -> list[GenResult]:
        """Results in order. With the continuous loop, more(n, accept) may hand over up to n further
        requests while this runs (accept(req) says which fit), and on_done(k, result) hears of each
        request as it finishes (k: its position among the given, then the pulled requests)."""
        if not reqs:
            return []
        reqs = list(reqs)
        budgets = [self.budget(len(r.prompt_ids), r.max_tokens) for r in reqs]
        track = _Tracker(self, reqs, budgets)
        gens = self._generators(reqs)
        if self.loop is None:
            self._run_static(reqs, budgets, track, gens)
            return track.results()

        def sample(logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
            return sample_tokens(logits, [reqs[i].temperature for i in idx], [reqs[i].top_p for i in idx],
                                 [gens[i] for i in idx])

        def on_token(i: int, t: int) -> bool:
            done = track.on_token(i, t)
            if done and on_done is not None:
                on_done(i, track.result(i))
            return done

        def pull(n: int, max_len: int) -> list[tuple[list[int], int]]:
            def fits(r: GenRequest) -> bool:  # one that does not fit (or cannot run) waits for a batch of its own
                try:
                    return bool(r.prompt_ids) and len(r.prompt_ids) + self.budget(len(r.prompt_ids), r.max_tokens) <= max_len
                except PromptTooLong:
                    return False
            new = more(n, fits)
            out = []
            for r in new:
                budget = self.budget(len(r.prompt_ids), r.max_tokens)
                track.add(r, budget)
                gens.extend(self._generators([r]))
                out.append((r.prompt_ids, budget))
            return out

        self.loop.run([r.prompt_ids for r in reqs], budgets, sample, on_token, self.device, self.dtype,
                      more=pull if more is not None else None, greedy=lambda i: reqs[i].temperature == 0)
        return track.results()

    def _run_static(self, reqs, budgets, track, gens) -> None:
        B = len(reqs)
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row's next token lands in the last column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        from transformers import DynamicCache
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        for _step in range(max(budgets)):
            nxt = sample_tokens(out.logits[:, -1, :], [r.temperature for r in reqs], [r.top_p for r in reqs], gens)
            for i, t in enumerate(nxt.tolist()):
                if track.finish[i] is None:
                    track.on_token(i, t)
            if all(f is not None for f in track.finish):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos,
                             past_key_values=cache, use_cache=True)

    def check_health(self) -> bool:
        return len(self.run([GenRequest(self.encode_prompt("Hi"), max_tokens=1, temperature=0)])) == 1

    def shutdown(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _Tracker:
    """Per-request output state: new tokens, eos / stop-string / budget endings, final results."""

    def __init__(self, engine: GenerationEngine, reqs: list[GenRequest], budgets: list[int]):
        self.engine, self.reqs, self.budgets = engine, reqs, budgets  # shared with run(): add() extends them
        self.tokens: list[list[int]] = [[] for _ in reqs]
        self.cut: list[str | None] = [None] * len(reqs)  # text truncated at a stop string
        self.finish: list[str | None] = [None] * len(reqs)

    def on_token(self, i: int, t: int) -> bool:
        """Records request i's next token; True when the request is finished."""
        if t in self.engine.eos_ids:
            self.finish[i] = "stop"
            return True
        self.tokens[i].append(t)
        stops = self.reqs[i].stop
        if stops:
            text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            hits = [text.find(s) for s in stops if s in text]
            if hits:
                self.cut[i] = text[: min(hits)]
                self.finish[i] = "stop"
                return True
        if len(self.tokens[i]) >= self.budgets[i]:
            self.finish[i] = "length"
            return True
        return False

    def add(self, req: GenRequest, budget: int) -> None:
        self.reqs.append(req)
        self.budgets.append(budget)
        self.tokens.append([])
        self.cut.append(None)
        self.finish.append(None)

    def result(self, i: int) -> GenResult:
        text = self.cut[i]
        if text is None:
            text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        return GenResult(text, self.finish[i] or "length", len(self.reqs[i].prompt_ids), len(self.tokens[i]),
                         self.tokens[i])

    def results(self) -> list[GenResult]:
        return [self.result(i) for i in range(len(self.reqs))]
