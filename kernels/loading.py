"""Loading Hugging Face directories and GGUF files onto a device, with a converted-GGUF cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk, never a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()  # per-tensor bars flood worker logs


def resolve_device(device: str) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available here")
    return d


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPUs (tensor cores, DESIGN.md reference numbers); fp32 on CPUs, where bf16 matmuls
    # are slower than fp32 on most x86 parts without AMX.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX-512 BF16 or AMX) make bf16 matmuls faster than fp32 on a CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (Inductor) builds its kernels with: $CXX, else
    g++ or clang++ on the PATH; None where there is none (compiled CPU engines cannot run there)."""
    import os
    import shutil
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


TRAIN_DEVICES = ("auto", "cpu", "cuda")


def training_device(choice: str) -> torch.device:
    """Where a student is distilled: 'auto' (the first GPU where CUDA has one, else the CPU),
    'cpu' or 'cuda' (an error where there is no GPU)."""
    if choice not in TRAIN_DEVICES:
        raise ValueError(f"the training device must be one of {', '.join(TRAIN_DEVICES)}, not {choice!r}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(choice)


def training_bf16(device: torch.device) -> bool:
    """Whether distillation autocasts its matmuls to bf16 there: on a GPU that has bf16, and on a
    CPU with native bf16 dot products (`cpu_has_bf16`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Mixed precision for CPU engines: 'auto' (bf16 where the CPU has native bf16), 'bf16', 'fp32'.
    Autocast runs matmuls in bf16 and keeps LayerNorm and softmax in fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"cpu precision must be auto, bf16 or fp32, not {precision!r}")
    if device.type != "cpu" or precision == "fp32":
        return None
    if precision == "bf16" or cpu_has_bf16():
        return torch.bfloat16
    return None


def file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:12]


def weights_revision(path: Path) -> str:
    """A content digest of the weight files: what actually ran, whatever the directory is called."""
    path = Path(path)
    if path.is_file():
        return file_digest([path])
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin")) or list(path.glob("*.gguf"))
    return file_digest(files) if files else "unknown"


def gguf_to_hf_dir(gguf: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file to a Hugging Face directory once (~25 s for SmolLM2-135M: tokenizer
    conversion and dequantization) and reuse it afterwards (~0.3 s to load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    target = Path(cache_dir) / f"{gguf.stem}-{file_digest([gguf])}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The tensors are already dequantized to fp32; the GGUF marker only blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: a concurrent converter either wins or finds it done
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(path: Path, cache_dir: Path, device: torch.device, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    revision = weights_revision(path)
    hf_dir = gguf_to_hf_dir(path, cache_dir) if path.suffix == ".gguf" else path
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype or default_dtype(device))
    model.to(device).eval()
    return model, tok, revision


def load_encoder(path: Path, device: torch.device, dtype: torch.dtype | None = None, classifier: bool = False):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if classifier else AutoModel
    tok = AutoTokenizer.from_pretrained(str(path))
    model = cls.from_pretrained(str(path), dtype=dtype or default_dtype(device))
    model.to(device).eval()
    return model, tok, weights_revision(Path(path))
