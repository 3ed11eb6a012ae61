"""docker/compose.yaml against the Compose Specification's JSON schema, and its services against
each other: one Redis URL and password, Flower behind auth, one GPU per worker. (No Docker engine
runs here; tests/data/compose-spec.json is the schema shipped in docker-compose 1.29.2's wheel.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV = {"REDIS_PASSWORD": "s3cret-pw", "FLOWER_BASIC_AUTH": "admin:flower-pw", "API_KEYS": "gm-compose-key-0123456789"}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:\?|:-)([^}$]*))?\}")  # innermost first


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, and $$ for $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "\0"  # a literal $, kept apart until the end
        name, op, arg = m.groups()
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    while True:  # innermost first: ${A:-${B}} is a default holding a variable
        done = _VAR.sub(sub, value)
        if done == value:
            return done.replace("\0", "$")
        value = done


def load(env: dict[str, str] = ENV) -> dict:
    raw = yaml.safe_load(COMPOSE.read_text())
    return interpolate({k: v for k, v in raw.items() if not k.startswith("x-")}, env)


def test_compose_file_matches_the_compose_specification():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(load())


def test_secrets_must_be_given():
    for missing in ENV:
        with pytest.raises(ValueError, match=missing):
            load({k: v for k, v in ENV.items() if k != missing})


def test_services_agree_on_redis_flower_and_gpus():
    from gristmill.producers.settings import Settings
    c = load()
    services = c["services"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == ENV["REDIS_PASSWORD"]
    redis_port = 6379
    cache_cmd = services["redis-cache"]["command"]
    assert cache_cmd[cache_cmd.index("--appendonly") + 1] == "no"
    assert cache_cmd[cache_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert cache_cmd[cache_cmd.index("--requirepass") + 1] == ENV["REDIS_PASSWORD"]
    assert not services["redis-cache"].get("ports"), "only this host's workers use the cache"
    gristmill = {name: s for name, s in services.items() if not name.startswith(("redis", "sentinel"))}
    assert {"worker-gpu0", "worker-gpu1", "worker-cpu", "flower", "api"} <= set(gristmill)
    for name, s in gristmill.items():
        env = s["environment"]
        url = urlparse(env["GRISTMILL_REDIS_URL"])
        assert (url.hostname, url.port or 6379, url.password) == ("redis", redis_port, ENV["REDIS_PASSWORD"]), name
        assert "redis" in s["depends_on"], name
        if name.startswith("worker"):
            cache = urlparse(env["GRISTMILL_DEDUP_REDIS_URL"])
            assert (cache.hostname, cache.password) == ("redis-cache", ENV["REDIS_PASSWORD"]), name
            assert "redis-cache" in s["depends_on"], name
        # each service's environment is a valid gristmill configuration
        Settings(**{k.removeprefix("GRISTMILL_").lower(): v for k, v in env.items()})
        dockerfile = ROOT / "docker" / Path(s["build"]["dockerfile"]).name
        assert dockerfile.exists(), name
    flower = gristmill["flower"]
    assert flower["environment"]["GRISTMILL_FLOWER_BASIC_AUTH"] == ENV["FLOWER_BASIC_AUTH"]
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"]), "Flower is published on loopback only"
    api = gristmill["api"]
    assert api["environment"]["GRISTMILL_API_KEYS"] == ENV["API_KEYS"], "the API refuses to start without keys"
    assert api["environment"]["GRISTMILL_SERVE_HOST"] == "0.0.0.0" and api["command"][:2] == ["gristmill", "serve"]
    assert all(p.startswith("127.0.0.1:") for p in api["ports"]), "the API is published on loopback only"
    gpus = {}
    for name, s in gristmill.items():
        if not name.startswith("worker-gpu"):
            continue
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert dev["capabilities"] == ["gpu"] and len(dev["device_ids"]) == 1
        gpus[name] = dev["device_ids"][0]
        cmd = s["command"]
        assert cmd[cmd.index("--device") + 1] == "cuda:0", "its one reserved GPU is cuda:0 inside the container"
        assert "Dockerfile.gpu" in s["build"]["dockerfile"]
    assert len(set(gpus.values())) == len(gpus) == 2, "one worker per GPU"
    host_ports = [p.split(":")[1] for s in gristmill.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "metrics and Flower ports do not collide"


def test_the_ha_profile_runs_a_replica_and_three_sentinels_that_gristmill_finds():
    from gristmill.producers.redis_server import SentinelUrl
    from gristmill.producers.settings import Settings
    url = ";".join(f"sentinel://:{ENV['REDIS_PASSWORD']}@sentinel-{k}:26379" for k in (1, 2, 3)) + "/0"
    c = load({**ENV, "GRISTMILL_REDIS_URL": url, "GRISTMILL_REDIS_MIN_REPLICAS": "1"})
    services = c["services"]
    ha = {name for name, s in services.items() if "ha" in s.get("profiles", [])}
    assert ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    assert replica[replica.index("--masterauth") + 1] == ENV["REDIS_PASSWORD"]
    assert replica[replica.index("--appendonly") + 1] == "yes"
    for k in (1, 2, 3):
        script = services[f"sentinel-{k}"]["entrypoint"][-1]
        assert "sentinel monitor mymaster redis 6379 2" in script and "--sentinel" in script
        assert '"$REDIS_PASSWORD"' in script  # the shell, not compose, reads it
    assert {h for h, _ in SentinelUrl.parse(url).sentinels} == {"sentinel-1", "sentinel-2", "sentinel-3"}
    for name, s in services.items():
        if name.startswith(("worker", "flower", "api")):
            env = s["environment"]
            assert env["GRISTMILL_REDIS_URL"] == url and env["GRISTMILL_REDIS_MIN_REPLICAS"] == "1", name
            Settings(**{k.removeprefix("GRISTMILL_").lower(): v for k, v in env.items()})
    assert c["volumes"].keys() >= {"redis-data", "redis-replica-data"}
