"""Remote-control commands a worker answers (Celery broadcast): what it runs on and how it batches.

    app.control.broadcast("gristmill_stats", reply=True)
"""

from __future__ import annotations

import os

from celery.worker.control import inspect_command


@inspect_command(name="gristmill_stats")
def gristmill_stats(state, **kwargs):
    from .tasks import _state
    info = {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "physical_gpu": os.environ.get("GRISTMILL_PHYSICAL_GPU"), "engines": {}, "batcher": None}
    if _state is None:
        return info
    s = _state.batcher.stats
    info["batcher"] = {"batches": s.batches, "items": s.items, "mean_batch_size": s.mean_batch_size,
                       "padding_waste": s.padding_waste, "splits": s.splits, "busy_s": s.busy_s,
                       "real_tokens": s.real_tokens, "padded_tokens": s.padded_tokens,
                       "items_per_busy_s": s.items / s.busy_s if s.busy_s else 0.0}
    for name, eng in _state.host.loaded().items():
        if getattr(eng, "model", None) is None:  # an ONNX Runtime engine
            info["engines"][name] = {"device": ",".join(eng.session.get_providers()), "dtype": "onnx",
                                     "variant": eng.variant}
            continue
        p = next(eng.model.parameters())
        entry = {"device": str(p.device), "dtype": str(p.dtype), "variant": eng.variant}
        if p.device.type == "cuda":
            import torch
            props = torch.cuda.get_device_properties(p.device)
            entry.update(gpu_name=props.name, gpu_uuid=str(getattr(props, "uuid", "")),
                         pci_bus_id=getattr(props, "pci_bus_id", None))
        info["engines"][name] = entry
    return info


@inspect_command(name="gristmill_reset_stats")
def gristmill_reset_stats(state, **kwargs):
    from .batcher import BatchStats
    from .tasks import _state
    if _state is not None:
        _state.batcher.stats = BatchStats()
    return {"ok": True}
