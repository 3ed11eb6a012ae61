"""GPU pinning: a worker sees exactly one GPU, chosen before torch is imported."""

from __future__ import annotations

import os
import sys


def pin(device: str) -> str:
    """Pin this process to `device` ('cpu' or 'cuda:N'); returns the device name to use inside it.

    CUDA_VISIBLE_DEVICES is read when CUDA initialises, so it must be set before torch is imported;
    inside the process the pinned GPU is then 'cuda:0'.
    """
    if "torch" in sys.modules:
        raise RuntimeError("pin() must run before torch is imported")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    if device == "cuda":
        device = "cuda:0"
    if not device.startswith("cuda:") or not device[5:].isdigit():
        raise ValueError(f"device must be 'cpu' or 'cuda:N', got {device!r}")
    os.environ["CUDA_VISIBLE_DEVICES"] = device[5:]
    os.environ["GRISTMILL_PHYSICAL_GPU"] = device[5:]
    return "cuda:0"


def visible_gpus() -> list[int]:
    """Indexes of the GPUs this host shows (respecting CUDA_VISIBLE_DEVICES), without touching CUDA."""
    import torch  # the launcher only; workers pin first
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
