"""gristmill as users get it: one `gristmill` import namespace that loads the real default models from
the repository root, from any other directory, as an editable install and as a built wheel, with
Hugging Face's `kernels` (which transformers >= 5.25 imports) installed beside it; and `gristmill
demo`, which must fail loudly when a line that should succeed does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.commands import GRISTMILL, ROOT

from .conftest import worker_env
from .helpers import classification, write_jsonl

pytestmark = pytest.mark.slow

# Loads the real all-MiniLM-L6-v2 moderation model through gristmill's engine and scores two texts;
# prints where gristmill, its parts and `kernels` were imported from.
PROBE = """
import json, sys, importlib.util
import transformers  # imports Hugging Face's `kernels` where transformers needs it
import gristmill, gristmill.kernels.classify as classify
from gristmill.producers.registry import DEFAULT_CLASSIFIER
from gristmill.workers.loading import classifier_kwargs
engine = classify.ClassifierEngine(DEFAULT_CLASSIFIER.resolve_path(), device="cpu", **classifier_kwargs(DEFAULT_CLASSIFIER))
scores = engine.run(engine.encode(["I will find you and kill you.", "Thank you for the lovely dinner."]))
k = importlib.util.find_spec("kernels")
print(json.dumps({"gristmill": gristmill.__file__, "classify": classify.__file__,
                  "kernels": None if k is None else k.origin, "transformers": transformers.__version__,
                  "threat": scores[0]["harassment/threatening"], "benign": scores[1]["harassment/threatening"],
                  "bare": sorted(m for m in sys.modules if m.split(".")[0] in ("producers", "workers"))}))
"""


def probe(cwd: Path, *, env: dict[str, str] | None = None, python: list[str] | None = None) -> dict:
    p = subprocess.run([*(python or [sys.executable]), "-c", PROBE], cwd=cwd, env={**os.environ, **(env or {})},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def check(found: dict, gristmill_dir: Path) -> None:
    assert Path(found["gristmill"]).parent == gristmill_dir, found
    assert found["kernels"] is None or "site-packages" in found["kernels"], f"`kernels` is ours: {found}"
    assert found["bare"] == [], found
    assert found["threat"] > 0.5 > found["benign"], found  # the real weights, scoring sensibly


@pytest.fixture(scope="module")
def hub_kernels() -> str:
    import importlib.util
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:  # transformers before 5.25 does not need it
        pytest.skip("Hugging Face's `kernels` is not installed here")
    return spec.origin


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("gristmill-*.whl")
    return whl


def test_the_editable_install_loads_a_real_model_from_the_repository_root(hub_kernels):
    check(probe(ROOT), ROOT / "gristmill")


def test_the_editable_install_loads_a_real_model_from_another_directory(hub_kernels, tmp_path):
    check(probe(tmp_path), ROOT / "gristmill")


def test_a_documented_benchmark_runs_from_the_repository_root(hub_kernels):
    p = subprocess.run([sys.executable, "-m", "benchmarks.batch_sweep", "--items", "16", "--sizes", "1,8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(figures["by_batch_size"]) == {"1", "8"} and figures["variant"].startswith("torch-")


def test_the_wheel_holds_one_top_level_name_and_its_data_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"gristmill", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    for data in ("gristmill/producers/examples/demo.jsonl", "gristmill/producers/policies/moderation-default.yaml",
                 "gristmill/kernels/moderation/seed.jsonl", "gristmill/workers/__main__.py"):
        assert data in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "gristmill = gristmill.producers.cli:main" in entry


def test_the_built_wheel_loads_a_real_model_from_any_directory(hub_kernels, wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # Its own directory first on sys.path (as site-packages would hold it); -P keeps the working
    # directory off sys.path, as for a console script. Both from elsewhere and from the repository root.
    for cwd in (tmp_path, ROOT):
        check(probe(cwd, env={"PYTHONPATH": str(target)}, python=[sys.executable, "-P"]), target / "gristmill")


def test_demo_passes_on_the_shipped_example_with_the_real_models(hub_kernels, tmp_path):
    # `gristmill demo` from a directory other than the repository root, with the real default models
    # (the converted GGUF is cached between runs, as test_real_models does)
    home = Path(os.environ.get("GRISTMILL_TEST_HOME", ROOT / ".state" / "test-home"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRISTMILL_")}
    p = subprocess.run([*GRISTMILL, "demo", "--gpus", "none"], cwd=tmp_path, env={**env, "GRISTMILL_HOME": str(home)},
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "17 completed, 2 failed of 19" in p.stderr, p.stderr[-3000:]
    assert "2 failed as intended" in p.stderr and "bad-unknown-model" in p.stderr and "FAILED" not in p.stderr
    assert sum(1 for _ in open(tmp_path / "out" / "demo-results.jsonl")) == 17


def test_demo_fails_and_names_the_first_line_that_should_have_succeeded(tiny_models_file, home, tmp_path):
    f = write_jsonl(tmp_path / "in.jsonl", [classification("ok"), classification("bad-meant", model="nope"),
                                            classification("oops", model="no-such-model"), classification("ok2")])
    env = {k: v for k, v in worker_env("unused", home, tiny_models_file).items() if k != "GRISTMILL_REDIS_URL"}
    p = subprocess.run([*GRISTMILL, "demo", "--gpus", "none", "--input", str(f), "--out-dir", str(tmp_path / "out")],
                       cwd=tmp_path, env={**env, "GRISTMILL_HOME": str(tmp_path / "home")}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "1 failed as intended" in p.stderr
    assert "FAILED: 1 line(s) that should succeed failed; the first, line 3 (oops): model_not_found" in p.stderr, \
        p.stderr[-3000:]
