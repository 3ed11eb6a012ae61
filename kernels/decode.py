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

On CUDA, steps run one ahead: the step takes the argmax itself (sampled rows draw right behind it,
on the device) and leaves the token, one position on, as each slot's next input, so step t+1 is
queued before step t's tokens are read, and the host's work overlaps the GPU's. Each layer's work
around the cache can run as two compiled functions of plain tensors (`compile_decode`), captured
inside the graphs with the rest of the step.

The forward reuses the model's own modules (embeddings, RMSNorms, projections, rotary tables,
MLPs), so weights and numerics are those of the Hugging Face model; only the attention's cache
handling is ours. Greedy outputs equal `generate`'s (tests/unit/test_decode.py, and the real
SmolLM2 weights in benchmarks/generation.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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
    """K and V for every layer: [layers, slots, kv_heads, max_len, head_dim], allocated once, and
    each slot's next decode input on the device: the token to feed (`tok`), the position it goes to
    (`pos`) and whether a request holds the slot (`live`). A decode step reads and advances these
    itself, so consecutive steps need nothing from the host."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.tok = torch.zeros(slots, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.live = torch.zeros(slots, dtype=torch.long, device=device)
        self.slots, self.max_len = slots, max_len

    def fits(self, slots: int, max_len: int) -> bool:
        return self.slots >= slots and self.max_len >= max_len

    def fill(self, r0: int, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Slots r0.. start decoding: feed `tokens` at positions `lengths`."""
        n = tokens.shape[0]
        self.tok[r0:r0 + n] = tokens
        self.pos[r0:r0 + n] = lengths
        self.live[r0:r0 + n] = 1

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot src's first `length` positions and next input into slot dst (compaction after dst finished)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        for t in (self.tok, self.pos, self.live):
            t[dst] = t[src]

    def clear(self, slot: int) -> None:
        """An empty slot feeds token 0 at position 0, which the next prefill into it overwrites."""
        for t in (self.tok, self.pos, self.live):
            t[slot] = 0


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic, op for op."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention_in(x, cos, sin, ln, eps: float, wqkv, heads: int, kv_heads: int, head_dim: int):
    """RMSNorm, the q/k/v projections (one product over their stacked weights) and rotary: a
    layer's work before it reads the cache."""
    B, T, _ = x.shape
    h = _rms_norm(x, ln, eps)
    q, k, v = F.linear(h, wqkv).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(B, T, heads, head_dim).transpose(1, 2)
    k = k.reshape(B, T, kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(B, T, kv_heads, head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _attention_out(x, o, wo, ln, eps: float, wgu, wd):
    """The output projection and residual, RMSNorm, the SwiGLU MLP (gate and up as one product
    over their stacked weights) and residual."""
    B, heads, T, head_dim = o.shape
    x = x + F.linear(o.transpose(1, 2).reshape(B, T, heads * head_dim), wo)
    h = _rms_norm(x, ln, eps)
    gate, up = F.linear(h, wgu).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, wd)


def _plain_layers(model) -> list[tuple] | None:
    """Each layer's weights for the functions above (q/k/v and gate/up stacked: a copy of those), or
    None when a layer is not plain Llama (biases, another activation or norm): then the model's own
    modules run."""
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "attention_bias", False) \
            or getattr(cfg, "mlp_bias", False):
        return None
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        lns = (layer.input_layernorm, layer.post_attention_layernorm)
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        if any(type(n).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") for n in lns) \
                or any(lin.bias is not None for lin in linears):
            return None
        eps = [getattr(n, "variance_epsilon", getattr(n, "eps", 1e-6)) for n in lns]
        wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
        wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()
        out.append(((lns[0].weight, eps[0], wqkv), (a.o_proj.weight, lns[1].weight, eps[1], wgu, m.down_proj.weight)))
    return out


class LlamaStepper:
    """One forward of a Llama-family model over rows r0..r0+B-1 of a SlotCache."""

    def __init__(self, model, *, compile_decode: bool = False):
        cfg = model.config
        self.model = model
        self.layers = model.model.layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        # Decode steps may run each layer as two functions of plain tensors, compiled: torch.compile
        # fuses RMSNorm, rotary, SwiGLU and the residual adds, which in eager mode are dozens of small
        # kernels per layer that a one-token step cannot fill the GPU with. Weights are arguments,
        # so one compiled graph serves all layers. The cache writes and attention stay eager.
        self.plain = _plain_layers(model) if compile_decode else None
        self.compiled = None
        if self.plain is not None:
            # eager's rounding of each intermediate to the model's dtype, so bf16 outputs stay eager's
            opts = {"emulate_precision_casts": True}
            self.compiled = (torch.compile(_attention_in, dynamic=False, options=opts),
                             torch.compile(_attention_out, dynamic=False, options=opts))

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
        # as an additive mask, made once: SDPA would turn a boolean one into this in every layer
        visible = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, float("-inf"))
        if T == 1:
            where = pos.view(B, 1, 1, 1).expand(B, self.kv_heads, 1, self.head_dim)
        fns = self.compiled if T == 1 and self.compiled is not None else None
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            if fns is not None:
                w_in, w_out = self.plain[li]
                q, k, v = fns[0](x, cos, sin, *w_in, self.heads, self.kv_heads, self.head_dim)
            else:
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
            if fns is not None:
                x = fns[1](x, o, *w_out)
            else:
                x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = inner.norm(x[:, 0] if T == 1 else x[torch.arange(B, device=ids.device), last])
        return self.model.lm_head(x)

    def decode(self, cache: SlotCache, b: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step over slots 0..b-1 from the cache's own inputs: returns the logits and their
        argmax, and leaves the argmax as each slot's next input, one position on (live slots only).
        Greedy decoding can so queue step after step with no host round trip in between."""
        logits = self.forward(cache, 0, cache.tok[:b, None], cache.pos[:b, None], None, kv_len)
        nxt = logits.argmax(dim=-1)
        cache.tok[:b] = nxt
        cache.pos[:b] += cache.live[:b]
        return logits, nxt


@dataclass
class _Running:
    index: int  # position in the caller's request list
    length: int  # cache positions written, or queued to be written, for this request
    done: bool = False  # finished: its tokens from steps already queued are dropped


@dataclass
class LoopStats:
    """What the last run did: forwards, and how full the decode batches were."""
    prefills: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum over decode steps of rows computed (a finished row may run one step ahead)
    new_tokens: int = 0

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0


LENGTH_BUCKET = 128  # graphed steps attend over the cache prefix rounded up to this many positions


class GraphedDecode:
    """The decode step captured as CUDA graphs, one per (batch bucket, attention-length bucket):
    batch sizes are powers of two from 8 up to the cache's slots, lengths multiples of LENGTH_BUCKET
    up to its max_len. Rows past the running ones compute on slots that hold no request (token 0 at
    position 0, which a prefill overwrites before any read) and do not advance.

    Capture happens on the first step of a bucket: the warm-up runs the real step twice, putting the
    slots' inputs back after each, so its cache writes are the ones the replay then makes again.
    """

    def __init__(self, stepper: LlamaStepper, cache: SlotCache):
        self.stepper, self.cache = stepper, cache
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def bucket(self, n: int) -> int:
        b = 8
        while b < n:
            b *= 2
        return min(b, self.cache.slots)

    def length_bucket(self, kv_len: int) -> int:
        return min(-(-kv_len // LENGTH_BUCKET) * LENGTH_BUCKET, self.cache.max_len)

    def __call__(self, n: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.bucket(n), self.length_bucket(kv_len))
        entry = self.graphs.get(key)
        if entry is None:
            cache = self.cache
            tok, pos = cache.tok.clone(), cache.pos.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.stepper.decode(cache, *key)
                    cache.tok.copy_(tok)
                    cache.pos.copy_(pos)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.stepper.decode(cache, *key)
            entry = self.graphs[key] = (graph, out)
        graph, (logits, nxt) = entry
        graph.replay()
        return logits[:n], nxt[:n]


class ContinuousLoop:
    """Iteration-level scheduling of GenRequests over a LlamaStepper; `finish(i, token)` decides
    when a request ends (the engine's eos / stop / budget logic)."""

    def __init__(self, model, *, max_slots: int, prefill_tokens: int = 8192, cuda_graphs: bool = True,
                 run_ahead: bool | None = None, compile_decode: bool = False):
        self.stepper = LlamaStepper(model, compile_decode=compile_decode)
        self.run_ahead = run_ahead  # queue each step before reading the last one's tokens; None: on CUDA only
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
        for t in (self.cache.tok, self.cache.pos, self.cache.live):
            t.zero_()  # a run that raised may have left slots live
        return self.cache

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], limits: list[int], sample, on_token, device, dtype,
            more=None, greedy=None) -> None:
        """prompts: token ids; limits: max new tokens each. sample(logits [n, V], indices) -> token ids
        [n], on the device (a tensor: nothing read back); on_token(index, token) -> True when that
        request is finished (the token is then not fed). more(n, max_len) -> up to n further
        (prompt, limit) pairs that fit max_len cache positions, asked for whenever slots are free:
        requests that arrive while this runs join it. Their indices continue after the given ones.
        greedy(index) -> True when that request takes the argmax, which the step itself computes:
        a step whose rows all do skips `sample`. On CUDA each step is queued before the previous
        step's tokens are read, so the host's bookkeeping overlaps the device's work (a finished row
        then computes one step more, whose token is dropped)."""
        self.stats = LoopStats()
        prompts, limits = list(prompts), list(limits)
        if any(not p for p in prompts):
            raise ValueError("a prompt has no tokens: generation needs at least one input token")
        slots = self.max_slots if more is not None else min(self.max_slots, len(prompts))
        cache = self._cache_for(slots, max(len(p) + n for p, n in zip(prompts, limits)), device, dtype)
        cuda = torch.device(device).type == "cuda"
        ahead = int(cuda if self.run_ahead is None else self.run_ahead)
        # Longest budget first: short requests then fill the slots that long ones leave, instead of
        # a long one starting late and decoding alone at the end (the classic makespan rule).
        waiting = deque(sorted(range(len(prompts)), key=lambda i: -limits[i]))
        running: list[_Running] = []
        inflight: deque = deque()  # queued decode steps whose tokens are not read yet: (rows, tokens, event)

        def deliver(rows: list[_Running], tokens: list[int]) -> None:
            for r, t in zip(rows, tokens):
                if r.done:
                    continue
                self.stats.new_tokens += 1
                r.done = bool(on_token(r.index, t))
            for j in reversed(range(len(running))):  # swap the last running slot into each finished one
                if running[j].done:
                    last = len(running) - 1
                    if j != last:
                        cache.move(last, j, running[last].length)
                        running[j] = running[last]
                    cache.clear(last)
                    running.pop()

        def read_one() -> None:
            rows, tokens, event = inflight.popleft()
            if event is not None:
                event.synchronize()
            deliver(rows, tokens.tolist())

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
            if not (waiting or running or inflight):
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
                lengths = torch.tensor([len(prompts[i]) for i in new])
                r0 = len(running)
                logits = self.stepper.forward(cache, r0, ids.to(device), pos.to(device), (lengths - 1).to(device),
                                              width)
                self.stats.prefills += 1
                first = sample(logits, new)
                cache.fill(r0, first, lengths.to(device))
                rows = [_Running(i, len(prompts[i])) for i in new]
                running.extend(rows)
                deliver(rows, first.tolist())
                continue  # admit more if prefill retired some at once; else decode
            if not running:
                read_one()
                continue
            n = len(running)
            kv_len = max(r.length for r in running) + 1
            if self.graphed is not None:
                logits, nxt = self.graphed(n, kv_len)
            else:
                logits, nxt = self.stepper.decode(cache, n, kv_len)
            rows = list(running)
            for r in rows:
                r.length += 1
            self.stats.decode_steps += 1
            self.stats.decode_rows += n
            if greedy is None or not all(greedy(r.index) for r in rows):
                # queued right behind the step, before any compaction: same order of slots
                nxt = sample(logits, [r.index for r in rows])
                cache.tok[:n] = nxt
            event = torch.cuda.Event() if cuda else None
            inflight.append((rows, nxt.to("cpu", non_blocking=True), event))  # pinned, when from CUDA
            if event is not None:
                event.record()
            if len(inflight) > ahead:
                read_one()
