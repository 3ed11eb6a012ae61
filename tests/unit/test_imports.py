import subprocess
import sys


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_producers_never_imports_torch_or_workers():
    out = run("import sys, producers, producers.cli, producers.client, producers.ingest; "
              "print(sorted(m for m in ('torch', 'transformers', 'workers', 'kernels') if m in sys.modules))")
    assert out == "[]"


def test_kernels_package_import_is_light():
    assert run("import sys, kernels; print('torch' in sys.modules)") == "False"


def test_transformers_does_not_mistake_our_kernels_for_hugging_face_kernels(tiny_models_file):
    # transformers probes find_spec("kernels") for the hub `kernels` package; ours must not pass.
    weights = tiny_models_file.parent / "weights" / "classifier"
    out = run("import kernels, transformers\n"
              "from transformers.utils import import_utils as iu\n"
              "from transformers import AutoModelForSequenceClassification as A\n"
              f"A.from_pretrained({str(weights)!r})\n"
              "print(iu.is_kernels_available())")
    assert out == "False"


def test_pin_sets_visible_devices_before_torch():
    out = run("import os, workers.pinning as p; d = p.pin('cuda:3'); import torch; "
              "print(d, os.environ['CUDA_VISIBLE_DEVICES'])")
    assert out == "cuda:0 3"
    out = run("import torch, workers.pinning as p\ntry:\n p.pin('cpu')\nexcept RuntimeError as e:\n print('refused')")
    assert out == "refused"
