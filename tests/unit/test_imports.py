"""The import namespace: `gristmill` is the only top-level name of ours, and its parts import only
what they must."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str, cwd: Path = ROOT) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd=cwd).stdout.strip()


def test_the_producers_import_neither_torch_nor_the_workers():
    out = run("import sys, gristmill, gristmill.producers.cli, gristmill.producers.client, gristmill.producers.ingest; "
              "print(sorted(m for m in ('torch', 'transformers', 'gristmill.workers', 'gristmill.kernels') "
              "if m in sys.modules))")
    assert out == "[]"


def test_the_public_api_is_at_the_top():
    out = run("import gristmill as g; from gristmill import Client, Batch, Settings, GristmillError, Policy; "
              "from gristmill.producers.errors import GristmillError as E; "
              "print(Client.__module__, Batch.__module__, GristmillError is E, sorted(g.__all__) == g.__all__)")
    assert out == "gristmill.producers.client gristmill.producers.batches True True"


def test_kernels_import_is_light():
    # the GPU benchmark host lacks redis, celery and pydantic: the compute side must not need them
    out = run("import sys, gristmill.kernels, gristmill.kernels.texts; "
              "print(sorted(m for m in ('torch', 'redis', 'celery', 'pydantic') if m in sys.modules))")
    assert out == "[]"


def test_no_bare_top_level_name_of_ours_is_importable_as_a_package():
    # From the repository root (sys.path[0] for `python -c`), `producers`, `workers` and `kernels`
    # are at most namespace portions: any installed package of the same name wins, and none of
    # our modules loads under a bare name.
    out = run("import importlib.util as u\n"
              "for name in ('producers', 'workers'):\n"
              "    s = u.find_spec(name)\n"
              "    print(name, s is None or s.origin is None)\n"
              "import gristmill.producers.constants, gristmill.workers.pinning, sys\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('producers', 'workers')))")
    assert out.splitlines() == ["producers True", "workers True", "[]"]


def test_hugging_face_kernels_wins_over_our_folder_from_the_repository_root(tiny_models_file):
    # transformers >= 5.25 imports Hugging Face's `kernels`; our kernels/ folder in the working
    # directory must not stand in for it (it did, and every model load failed).
    weights = tiny_models_file.parent / "weights" / "classifier"
    out = run("import importlib.util, transformers\n"
              "from transformers import AutoModelForSequenceClassification as A\n"
              f"A.from_pretrained({str(weights)!r})\n"
              "s = importlib.util.find_spec('kernels')\n"
              "print(s is None or s.origin is None or 'site-packages' in s.origin)")
    assert out == "True"


def test_pin_sets_visible_devices_before_torch():
    out = run("import os, gristmill.workers.pinning as p; d = p.pin('cuda:3'); import torch; "
              "print(d, os.environ['CUDA_VISIBLE_DEVICES'])")
    assert out == "cuda:0 3"
    out = run("import torch, gristmill.workers.pinning as p\ntry:\n p.pin('cpu')\nexcept RuntimeError as e:\n print('refused')")
    assert out == "refused"
