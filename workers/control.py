"""Remote-control commands a worker answers (Celery broadcast): what it runs on and how it batches.

    app.control.broadcast("gristmill_stats", reply=True)
"""

from __future__ import annotations

import os

from celery.worker.control import inspect_command


@inspect_command(name="gristmill_stats")
def gristmill_stats(state, **kwargs):
    from .batcher import KEY_TAG
    from .tasks import _state
    info = {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "physical_gpu": os.environ.get("GRISTMILL_PHYSICAL_GPU"), "engines": {}, "batcher": None}
    if _state is None:
        return info
    s = _state.batcher.stats
    info["batcher"] = {"batches": s.batches, "items": s.items, "mean_batch_size": s.mean_batch_size,
                       "padding_waste": s.padding_waste, "splits": s.splits, "busy_s": s.busy_s,
                       "real_tokens": s.real_tokens, "padded_tokens": s.padded_tokens,
                       "items_per_busy_s": s.items / s.busy_s if s.busy_s else 0.0,
                       # per batcher key, its tag shown after "/" (a cascade's escalated inputs: "MODEL/escalated")
                       "by_key": {k.replace(KEY_TAG, "/"): {"items": n, "batches": s.batches_by_key.get(k, 0)}
                                  for k, n in s.by_key.items()}}
    for name, eng in _state.host.loaded().items():
        info["engines"][name] = _describe(eng)
    return info


def _describe(eng) -> dict:
    """Where an engine runs: a torch model's device and dtype (and GPU), an ONNX Runtime session's
    providers, a cascade's stages (student, middle where there are three, full), as `decided_by`
    names them."""
    if hasattr(eng, "student") and hasattr(eng, "teacher"):
        later = eng.teacher
        stages = {"student": _describe(eng.student)}
        if eng.three_stages:  # a cascade as the full model: its first stage is the middle one
            stages["middle"], later = _describe(later.student), later.teacher
        stages["full"] = _describe(later)
        return {"device": str(eng.device), "dtype": "cascade", "variant": eng.variant, "stages": stages}
    if getattr(eng, "model", None) is None:  # an ONNX Runtime engine
        return {"device": ",".join(eng.session.get_providers()), "dtype": "onnx", "variant": eng.variant}
    p = next(eng.model.parameters())
    entry = {"device": str(p.device), "dtype": str(p.dtype), "variant": eng.variant}
    if p.device.type == "cuda":
        import torch
        props = torch.cuda.get_device_properties(p.device)
        entry.update(gpu_name=props.name, gpu_uuid=str(getattr(props, "uuid", "")),
                     pci_bus_id=getattr(props, "pci_bus_id", None))
    return entry


@inspect_command(name="gristmill_reset_stats")
def gristmill_reset_stats(state, **kwargs):
    from .batcher import BatchStats
    from .tasks import _state
    if _state is not None:
        _state.batcher.stats = BatchStats()
    return {"ok": True}
