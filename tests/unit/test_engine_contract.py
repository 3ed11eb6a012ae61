"""Every engine a worker loads keeps the contract in kernels/engine.py (the host checks each one as
it loads: the torch engines here, ONNX Runtime artifacts in test_optimize, cascades in
test_cascade), and one that does not is refused with the members it lacks."""

from __future__ import annotations

import pytest

from gristmill.kernels.engine import Classifier, Generator, check_engine


def test_a_loaded_engine_passes_and_an_incomplete_one_is_refused(tiny_models_file, tmp_path):
    from gristmill.producers.settings import Settings
    from gristmill.workers.host import EngineHost
    host = EngineHost(Settings(models_file=tiny_models_file, builtin_models=False, home=tmp_path / "home"))
    for name in ("tiny-moderation", "tiny-chat"):
        eng = host.engine(name)
        assert isinstance(eng, Generator if name == "tiny-chat" else Classifier), name
    host.shutdown()

    class HalfEngine:
        variant, revision, labels = "half", "r", ["a"]

        def run(self, payloads):
            return payloads
    with pytest.raises(TypeError, match="HalfEngine is not a Classifier engine: it lacks check_health, encode, "
                                        "score_fields, shutdown"):
        check_engine(HalfEngine(), generator=False)
