"""Tiny random models built locally from configs (no hub): a Llama causal LM with a chat template,
a BERT sequence classifier and a BERT encoder, sharing one small BPE tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from gristmill.producers.registry import DEFAULT_PROTOTYPES

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "what is the capital of france",
          "hello world this is a test of the tokenizer", "batch inference with queues and workers",
          "i will hurt you", "have a lovely day in the park"] * 20


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_all(root: Path) -> dict[str, Path]:
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertModel, LlamaConfig,
                              LlamaForCausalLM)

    root.mkdir(parents=True, exist_ok=True)
    paths = {k: root / k for k in ("chat", "classifier", "encoder")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    tok = None
    for p in paths.values():
        tok = build_tokenizer(p)
    vocab = len(tok)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    llama.save_pretrained(paths["chat"])
    bert = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    labels = ["positive", "negative", "neutral"]
    clf = BertForSequenceClassification(BertConfig(**bert, num_labels=3, id2label=dict(enumerate(labels)),
                                                   label2id={n: i for i, n in enumerate(labels)}))
    clf.save_pretrained(paths["classifier"])
    BertModel(BertConfig(**bert)).save_pretrained(paths["encoder"])
    return paths


def models_file(root: Path) -> Path:
    paths = build_all(root / "weights")
    specs = [
        {"name": "tiny-chat", "kind": "causal_lm", "path": str(paths["chat"]), "max_input_tokens": 128,
         "default_max_tokens": 8, "aliases": ["tiny-lm"]},
        {"name": "tiny-classifier", "kind": "sequence_classifier", "path": str(paths["classifier"]),
         "max_input_tokens": 64, "thresholds": {"negative": 0.2}, "policy_version": "tiny-policy-7"},
        {"name": "tiny-moderation", "kind": "zero_shot", "path": str(paths["encoder"]), "max_input_tokens": 64,
         "prototypes": DEFAULT_PROTOTYPES, "policy_version": "tiny-mod-3"},
    ]
    f = root / "models.json"
    f.write_text(json.dumps(specs, indent=1))
    return f


def build_cascade(models: Path, work: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`gristmill optimize tiny-moderation --prune 0.5 --distill ... --cascade` (and `extra`
    options) into work/cascade: (the finished command, the artifact, a models file that adds it as
    "tiny-cascade")."""
    from tests.commands import GRISTMILL, ROOT
    transfer = work / "traffic.txt"
    transfer.write_text("\n".join(f"message {i}: the quick brown fox and the lazy dog, or i will hurt you"
                                  for i in range(300)) + "\n")
    texts = work / "heldout.txt"
    texts.write_text("\n".join(["i will hurt you", "have a lovely day", "hello world", "the quick brown fox"] * 30))
    env = {**os.environ, "GRISTMILL_MODELS_FILE": str(models), "GRISTMILL_BUILTIN_MODELS": "false",
           "GRISTMILL_HOME": str(work / "home")}
    out = work / "cascade"
    p = subprocess.run([*GRISTMILL, "optimize", "tiny-moderation", "--prune", "0.5", "--distill", str(transfer),
                        "--steps", "20", "--cascade", "--texts", str(texts), "--out", str(out), "--force", *extra],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    specs = json.loads(models.read_text())
    spec = next(m for m in specs if m["name"] == "tiny-moderation")
    with_cascade = work / "models.json"
    with_cascade.write_text(json.dumps(specs + [{**spec, "name": "tiny-cascade", "path": str(out)}]))
    return p, out, with_cascade


def through_batcher(host, key: str, payloads: list) -> list:
    """`payloads` run as a worker runs them: through a micro-batcher around `host.run` (a cascade's
    escalated inputs come back to it for the full model's stage)."""
    from gristmill.workers.batcher import BatchPolicy, MicroBatcher
    batcher = MicroBatcher(host.run, BatchPolicy(64, 1 << 20, 0.0))
    try:
        return [s.result(timeout=120) for s in batcher.submit(key, payloads, [len(p) for p in payloads])]
    finally:
        batcher.shutdown()
