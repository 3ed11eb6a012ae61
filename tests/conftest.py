import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.tinymodels import models_file  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "gpu" in parts:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_models_file(tiny_root) -> Path:
    return models_file(tiny_root)


@pytest.fixture(scope="session")
def tiny_settings(tiny_models_file, tmp_path_factory):
    from gristmill.producers.settings import Settings
    return Settings(models_file=tiny_models_file, builtin_models=False,
                    home=tmp_path_factory.mktemp("home"), redis_url="redis://unused:1/0")


@pytest.fixture(scope="session")
def weights(tiny_models_file) -> Path:
    """The tiny models' weight directories: chat, classifier, encoder."""
    return tiny_models_file.parent / "weights"
