"""Classification engines: a fine-tuned sequence classifier, or a sentence encoder's pooled
embedding scored by a trained linear head (kernels/heads.py) or by zero-shot label descriptions.

Both take pre-tokenized items (so that tokenization runs in the caller's thread, overlapped with
device work) and return one {label: score in [0, 1]} per item, in order.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import numpy as np
import torch

from .loading import autocast_dtype, default_dtype, load_encoder, resolve_device

# Zero-shot scores: sigmoid(SCALE * (sim_label - sim_neutral) + BIAS). sim_* are cosine similarities
# to the nearest description of the label / of ordinary text. Chosen on the real MiniLM weights so
# that ordinary sentences score < 0.1 and on-topic ones > 0.5 (tests/integration/test_real_models.py).
ZS_SCALE = 12.0
ZS_BIAS = -1.0


def _ids_only_tokenizer(tokenizer, max_length: int):
    """A copy of the fast tokenizer's Rust core that truncates and computes ids only.

    `encode_batch_fast` skips character offsets: 137 us instead of 222 us per 128-token text through
    the transformers call (one core), and tokenization is most of a classifier's host-side cost.
    Same ids as `tokenizer(texts, truncation=True, max_length=..., split_special_tokens=True)`
    (tests/unit/test_kernels.py): special-token text in an input stays text.
    None when the tokenizer has no Rust core or the library predates encode_batch_fast.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    from tokenizers import Tokenizer
    fast = Tokenizer.from_str(backend.to_str())
    fast.enable_truncation(max_length)
    fast.no_padding()
    # input text is text: "[SEP]" or "[CLS]" in it is read as characters, not as the model's
    # separator or start tokens (the post-processor still adds the real ones around it)
    fast.encode_special_tokens = True
    return fast


class ClassifierEngine:
    """load (constructor) / encode / run / check_health / shutdown."""

    def __init__(self, path: Path, *, device: str = "cpu", max_length: int = 512,
                 prototypes: dict[str, list[str]] | None = None, neutral: list[str] | None = None,
                 head: Path | None = None, pooled: bool = False, dtype: torch.dtype | None = None,
                 cpu_precision: str = "auto", quantize: str = "none",
                 sparsity: str = "none", compile: bool | str = False, chunk_cache: bool = False,
                 fast_tokenizer: bool = False, attention: str | None = None):
        self.device = resolve_device(device)
        self.quantize, self.sparsity, self.compiled = quantize, sparsity, compile
        # the torch encoder's attention implementation ("eager", "sdpa"); None: transformers' default
        self.attention = attention
        self.dtype = dtype or default_dtype(self.device)
        # On CPUs with native bf16 (AVX-512 BF16, AMX), bf16 autocast ran MiniLM-L6 1.4-1.8x faster
        # than fp32 at batch 64 on a 2-core AVX-512 BF16 machine (benchmarks/README.md, "Classifier
        # precision and engine variants").
        self.autocast = autocast_dtype(self.device, cpu_precision)
        # pooled: a sentence encoder whose mean-pooled embedding is scored by `head` or `prototypes`
        # (or returned as is, for training heads); else a sequence-classification model's logits.
        self.pooled = pooled or prototypes is not None or head is not None
        self._load_backend(path)
        self.max_length = min(max_length, getattr(self.config, "max_position_embeddings", max_length))
        self.pad_id = self.tokenizer.pad_token_id or 0
        self._fast = _ids_only_tokenizer(self.tokenizer, self.max_length)
        # BERT-style tokenizers: ids from a cache of whitespace chunks (kernels/tokenize.py)
        self._chunks = None
        if chunk_cache and self._fast is not None:
            from .tokenize import ChunkCacheTokenizer
            self._chunks = ChunkCacheTokenizer.build(self._fast, self.max_length)
        # pure-ASCII texts through a C++ WordPiece tokenizer, 4-6x the Rust one per core (kernels/tokenize.py)
        self._ascii = None
        if fast_tokenizer and self._fast is not None:
            from .tokenize import AsciiWordPiece
            self._ascii = AsciiWordPiece.build(self._fast, self.max_length)
        if self.quantize == "fp8-static":
            from .quant import calibrate_fp8
            from .texts import sentences
            calib = self.encode(sentences(256))
            calibrate_fp8(self.model, lambda: [self._forward(*self._pad(calib[i:i + 64])) for i in range(0, 256, 64)])
        if self.compiled:
            # Inductor fuses the elementwise work between matmuls (LayerNorm, GELU, residuals, the
            # quantize and rescale steps); the first batch of each new shape compiles (seconds).
            # A string is torch.compile's mode (e.g. "max-autotune-no-cudagraphs").
            self.model = torch.compile(self.model, **({} if self.compiled is True else {"mode": self.compiled}))
            self._warm_compiled()
        self._head = None
        if head is not None:
            from .heads import load_head
            w, b, self.labels, meta = load_head(Path(head))
            if w.shape[1] != self.config.hidden_size:
                raise ValueError(f"head {head} expects {w.shape[1]}-wide embeddings; the encoder gives "
                                 f"{self.config.hidden_size}")
            own = self._own_head(w)
            if own is not None:
                w, b = own
            self._head = (w.to(self.device), b.to(self.device))
            # a head built from a seed set is named by what it was built from, so that every
            # machine reports the same revision for it
            from .loading import file_digest
            self.revision = f"{self.revision}+{meta.get('source_digest') or file_digest([Path(head)])}"
        elif prototypes is not None:
            self.labels = list(prototypes)
            texts, owner = [], []
            for i, label in enumerate(self.labels):
                texts += prototypes[label]
                owner += [i] * len(prototypes[label])
            self._protos = self.embed(self.encode(texts))
            self._owner = torch.tensor(owner, device=self.device)
            self._neutral = self.embed(self.encode(neutral or ["."]))
        elif self.pooled:
            self.labels = []
        else:
            id2label = self.config.id2label
            self.labels = [id2label[i] for i in range(len(id2label))]
            self.multi_label = self.config.problem_type == "multi_label_classification"

    def _warm_compiled(self) -> None:
        """Compile at load, not on the first batches of work: a first shape, then a second that
        differs in batch and length, after which torch.compile traces both dimensions as dynamic
        and later batches reuse that graph (a batch of one still gets its own, on first use)."""
        for rows, length in ((2, 8), (3, 13)):
            ids = torch.full((rows, length), self.pad_id or 1, dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self._forward(ids, torch.ones_like(ids))

    def _own_head(self, registered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A head the loaded weights carry in place of the `registered` one (a student's own)."""
        return None

    def _load_backend(self, path: Path) -> None:
        """Sets model, tokenizer, config, revision and variant (the ONNX engine overrides this)."""
        self.model, self.tokenizer, self.revision = load_encoder(path, self.device, self.dtype,
                                                                 classifier=not self.pooled)
        self.config = self.model.config
        if self.attention is not None:
            self.model.set_attn_implementation(self.attention)
        precision = "bf16-autocast" if self.autocast is not None else str(self.dtype).removeprefix("torch.")
        from .quant import apply_variant, variant_suffix
        apply_variant(self.model, self.quantize, self.sparsity)
        suffix = variant_suffix(self.quantize, self.sparsity, self.compiled, self.attention)
        self.variant = f"torch-{precision}-{self.device.type}{suffix}"

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (pooled) or logits, as float32."""
        with self._amp():
            out = self.model(input_ids=ids, attention_mask=mask)
        return (out.last_hidden_state if self.pooled else out.logits).float()

    @property
    def score_fields(self) -> list[str]:
        """What each result holds, and the score cache keeps per input: the labels."""
        return self.labels

    @property
    def chunk_cache(self):
        """The chunk-cache tokenizer in use (its hits, misses and cache), or None."""
        return self._chunks

    @property
    def ascii_tokenizer(self):
        """The C++ tokenizer path for ASCII texts in use (its routed and passed counts), or None."""
        return self._ascii

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to max_length (over-long inputs are truncated, not refused)."""
        if self._ascii is not None:
            return self._ascii.encode(texts, self._encode)
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self._chunks is not None:
            return self._chunks.encode(texts)
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch_fast(texts)]
        return self.tokenizer(texts, truncation=True, max_length=self.max_length, split_special_tokens=True)["input_ids"]

    def _pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Vectorized: a per-row torch.tensor() loop took 39 ms for 2048 x 128 tokens, longer than the
        # H100's forward pass (24 ms) on the same batch.
        if not all(batch):
            # "" through a tokenizer that adds no special tokens has no ids; a row of none would be
            # all padding (or a batch 0 wide). It reads one pad token instead, like any text.
            batch = [row or [self.pad_id] for row in batch]
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        flat = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lengths.sum()))
        width = int(lengths.max())
        mask = np.arange(width) < lengths[:, None]
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        ids[mask] = flat
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
        if self.device.type == "cuda":
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        return ids_t.to(self.device, non_blocking=True), mask_t.to(self.device, non_blocking=True)

    def _amp(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        ids, mask = self._pad(batch)
        hidden = self._forward(ids, mask)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def run(self, batch: list[list[int]]) -> list[dict[str, float]]:
        if not batch:
            return []
        if self._head is not None:
            w, b = self._head
            scores = torch.sigmoid(self.embed(batch) @ w.T + b)
        elif self.pooled:
            emb = self.embed(batch)
            sims = emb @ self._protos.T  # [B, n_protos]
            per_label = torch.full((len(batch), len(self.labels)), -1.0, device=self.device)
            per_label = per_label.scatter_reduce(1, self._owner.expand(len(batch), -1), sims, reduce="amax")
            neutral = (emb @ self._neutral.T).amax(dim=1, keepdim=True)
            scores = torch.sigmoid(ZS_SCALE * (per_label - neutral) + ZS_BIAS)
        else:
            ids, mask = self._pad(batch)
            logits = self._forward(ids, mask)
            scores = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return self._rows(scores.float().cpu().tolist(), len(batch))

    def _rows(self, rows: list[list[float]], n: int) -> list[dict[str, float]]:
        """One {label: score} per input, checked against the batch size. Scores are float32 values
        (the score cache stores float32: a line computed here and one answered from the cache
        print the same digits)."""
        if len(rows) != n:
            raise RuntimeError(f"classifier returned {len(rows)} rows for {n} inputs")
        return [dict(zip(self.labels, r)) for r in rows]

    def check_health(self) -> bool:
        return len(self.run(self.encode(["health check"]))) == 1

    def shutdown(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
