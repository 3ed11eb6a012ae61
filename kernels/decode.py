"""Continuous (iteration-level) batching for Llama-family decoders over a slot KV cache.

Hugging Face `generate` runs a static batch: every row decodes until the longest row is done, and
a new request waits for the whole batch. Here each running request owns a slot of a KV cache that
is allocated once (grown only when a longer request arrives, never per step). Every iteration
first prefills waiting requests into free slots (right-padded, in one forward), then runs one
decode step for all running requests; a request that finishes frees its slot at once, and the next
waiting one takes it in the following iteration.

Running requests occupy slots 0..n-1 with no holes: a finished slot is refilled by moving the last
running slot's cache rows into it. Every step then works on views of the cache (`k[:, :n, :, :len]`)
with no gather, and attention reads only the filled prefix of the longest running row.

The forward reuses the model's own modules (embeddings, RMSNorms, projections, rotary tables,
MLPs), so weights and numerics are those of the Hugging Face model; only the attention's cache
handling is ours. Greedy outputs equal `generate`'s (tests/unit/test_decode.py, and the real
SmolLM2 weights in benchmarks/generation.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def supports(model) -> bool:
    """Decoders whose layers have the Llama shape: RMSNorm, q/k/v/o projections, rotary, gated MLP."""
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.model_type not in SUPPORTED_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False  # windowed attention would need a ring cache; the static loop handles it
    inner = getattr(model, "model", None)
    return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))


class SlotCache:
    """K and V for every layer: [layers, slots, kv_heads, max_len, head_dim], allocated once."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots, self.max_len = slots, max_len

    def fits(self, slots: int, max_len: int) -> bool:
        return self.slots >= slots and self.max_len >= max_len

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot src's first `length` positions into slot dst (compaction after dst finished)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class LlamaStepper:
    """One forward of a Llama-family model over rows r0..r0+B-1 of a SlotCache."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.layers = model.model.layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads

    def new_cache(self, slots: int, max_len: int, device: torch.device, dtype: torch.dtype) -> SlotCache:
        return SlotCache(len(self.layers), slots, self.kv_heads, max_len, self.head_dim, device, dtype)

    def forward(self, cache: SlotCache, r0: int, ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        """ids, pos: [B, T]; the token at (b, t) sits at position pos[b, t] of slot r0+b. Writes its K/V
        there, attends to positions <= its own, and returns the logits at column last[b]: [B, vocab].
        A prefill (T > 1) starts every row at position 0 (pos[b] = 0..T-1); a decode step has T = 1.
        Neither uses advanced indexing: a slice write for prefill, a scatter along the position axis
        for decode (that one runs inside CUDA graphs)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.model.model
        B, T = ids.shape
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x, pos)
        # key j is visible to the token at (b, t) iff j <= pos[b, t]: causal within the prompt, and
        # right-padding (positions past a row's prompt) is never read before decode overwrites it
        visible = (torch.arange(kv_len, device=ids.device)[None, None, :] <= pos[:, :, None]).unsqueeze(1)
        if T == 1:
            where = pos.view(B, 1, 1, 1).expand(B, self.kv_heads, 1, self.head_dim)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = cache.k[li, r0:r0 + B], cache.v[li, r0:r0 + B]
            if T == 1:
                kc.scatter_(2, where, k.to(kc.dtype))
                vc.scatter_(2, where, v.to(vc.dtype))
            else:
                kc[:, :, :T] = k.to(kc.dtype)
                vc[:, :, :T] = v.to(vc.dtype)
            o = F.scaled_dot_product_attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], attn_mask=visible,
                                               scale=attn.scaling, enable_gqa=self.kv_heads != self.heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = inner.norm(x[:, 0] if T == 1 else x[torch.arange(B, device=ids.device), last])
        return self.model.lm_head(x)


@dataclass
class _Running:
    index: int  # position in the caller's request list
    length: int  # tokens in the cache
    pending: int = -1  # sampled, not yet fed
    tokens: list[int] = field(default_factory=list)


@dataclass
class LoopStats:
    """What the last run did: forwards, and how full the decode batches were."""
    prefills: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum over decode steps of running requests
    new_tokens: int = 0

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0


class GraphedDecode:
    """The decode step captured as CUDA graphs, one per batch-size bucket (powers of two up to the
    cache's slots). A graph attends over the cache's whole length, masked, so that one capture
    serves every step; rows past the running ones compute on slot rows that hold no request (their
    writes land at position 0 of free slots, which a prefill overwrites before any read).

    Capture happens on the first step of a bucket with that step's real inputs: the warm-up runs
    the real step, so its cache writes are the ones the replay makes again, and nothing is corrupted.
    """

    def __init__(self, stepper: LlamaStepper, cache: SlotCache):
        self.stepper, self.cache = stepper, cache
        self.graphs: dict[int, tuple] = {}
        self.pool = None

    def bucket(self, n: int) -> int:
        b = 8
        while b < n:
            b *= 2
        return min(b, self.cache.slots)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        b = self.bucket(n)
        entry = self.graphs.get(b)
        if entry is None:
            dev = ids.device
            s_ids = torch.zeros((b, 1), dtype=torch.long, device=dev)
            s_pos = torch.zeros((b, 1), dtype=torch.long, device=dev)
            s_last = torch.zeros(b, dtype=torch.long, device=dev)
            s_ids[:n], s_pos[:n] = ids, pos
            step = lambda: self.stepper.forward(self.cache, 0, s_ids, s_pos, s_last, self.cache.max_len)  # noqa: E731
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = step()
            entry = self.graphs[b] = (graph, s_ids, s_pos, out)
        graph, s_ids, s_pos, out = entry
        s_ids[:n], s_pos[:n] = ids, pos
        s_ids[n:], s_pos[n:] = 0, 0
        graph.replay()
        return out[:n]


class ContinuousLoop:
    """Iteration-level scheduling of GenRequests over a LlamaStepper; `finish(i, token)` decides
    when a request ends (the engine's eos / stop / budget logic)."""

    def __init__(self, model, *, max_slots: int, prefill_tokens: int = 8192, cuda_graphs: bool = True):
        self.stepper = LlamaStepper(model)
        self.max_slots = max_slots
        self.prefill_tokens = prefill_tokens  # padded tokens per prefill forward
        self.cuda_graphs = cuda_graphs
        self.cache: SlotCache | None = None
        self.graphed: GraphedDecode | None = None
        self.stats = LoopStats()

    def _cache_for(self, slots: int, max_len: int, device, dtype) -> SlotCache:
        if torch.device(device).type == "cuda":
            slots = self.max_slots  # one allocation, and captured graphs, for every batch size
        if self.cache is None or not self.cache.fits(slots, max_len):
            # grow (rarely: a longer request or a larger batch than before), never per step
            slots = max(slots, self.cache.slots if self.cache else 0)
            max_len = max(max_len, self.cache.max_len if self.cache else 0)
            self.cache = self.graphed = None
            self.cache = self.stepper.new_cache(slots, max_len, device, dtype)
            if self.cuda_graphs and torch.device(device).type == "cuda":
                self.graphed = GraphedDecode(self.stepper, self.cache)  # graphs hold the cache's addresses
        return self.cache

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], limits: list[int], sample, on_token, device, dtype,
            more=None) -> None:
        """prompts: token ids; limits: max new tokens each. sample(logits [n, V], indices) -> token ids;
        on_token(index, token) -> True when that request is finished (the token is then not fed).
        more(n, max_len) -> up to n further (prompt, limit) pairs that fit max_len cache positions,
        asked for whenever slots are free: requests that arrive while this runs join it. Their
        indices continue after the given ones."""
        self.stats = LoopStats()
        prompts, limits = list(prompts), list(limits)
        if any(not p for p in prompts):
            raise ValueError("a prompt has no tokens: generation needs at least one input token")
        slots = self.max_slots if more is not None else min(self.max_slots, len(prompts))
        cache = self._cache_for(slots, max(len(p) + n for p, n in zip(prompts, limits)), device, dtype)
        waiting = deque(range(len(prompts)))
        running: list[_Running] = []

        def retire(done: list[int]) -> None:
            for j in sorted(done, reverse=True):  # swap the last running slot into each hole
                last = len(running) - 1
                if j != last:
                    cache.move(last, j, running[last].length)
                    running[j] = running[last]
                running.pop()

        def deliver(rows: list[_Running], tokens: list[int]) -> None:
            done = set()
            for r, t in zip(rows, tokens):
                self.stats.new_tokens += 1
                if on_token(r.index, t):
                    done.add(id(r))
                else:
                    r.pending = t
            retire([k for k, r in enumerate(running) if id(r) in done])

        # Admit waiting requests once this many slots are free (or nothing runs): each prefill is a
        # whole forward, and on a GPU one request's prefill costs about what 32 requests' does.
        admit_at = max(1, slots // 8)
        while True:
            free = slots - len(running)
            if more is not None and free > len(waiting) and free - len(waiting) >= min(admit_at, free):
                for p, n in more(free - len(waiting), cache.max_len):
                    if not p:
                        raise ValueError("a prompt has no tokens: generation needs at least one input token")
                    waiting.append(len(prompts))
                    prompts.append(p)
                    limits.append(n)
            if not (waiting or running):
                break
            if waiting and free and (not running or free >= min(admit_at, len(waiting))):
                new: list[int] = []
                width = 0
                while waiting and len(running) + len(new) < slots:
                    w = max(width, len(prompts[waiting[0]]))
                    if new and w * (len(new) + 1) > self.prefill_tokens:
                        break
                    width = w
                    new.append(waiting.popleft())
                ids = torch.zeros((len(new), width), dtype=torch.long)
                for b, i in enumerate(new):
                    ids[b, :len(prompts[i])] = torch.tensor(prompts[i])
                pos = torch.arange(width).expand(len(new), width)
                last = torch.tensor([len(prompts[i]) - 1 for i in new])
                r0 = len(running)
                logits = self.stepper.forward(cache, r0, ids.to(device), pos.to(device), last.to(device), width)
                self.stats.prefills += 1
                rows = [_Running(i, len(prompts[i])) for i in new]
                running.extend(rows)
                deliver(rows, sample(logits, new))
                continue  # admit more if prefill retired some at once; else decode
            n = len(running)
            ids = torch.tensor([[r.pending] for r in running], device=device)
            pos = torch.tensor([[r.length] for r in running], device=device)
            if self.graphed is not None:
                logits = self.graphed(ids, pos)
            else:
                kv_len = max(r.length for r in running) + 1
                logits = self.stepper.forward(cache, 0, ids, pos, torch.zeros(n, dtype=torch.long, device=device),
                                              kv_len)
            self.stats.decode_steps += 1
            self.stats.decode_rows += n
            for r in running:
                r.length += 1
            deliver(list(running), sample(logits, [r.index for r in running]))
