import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gristmill.producers import constants as C
from tests.commands import ROOT


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat(cid: str, text: str = "hello world", **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": C.CHAT_URL,
            "body": {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0, **body}}


def completion(cid: str, prompt: str = "the quick", **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": C.COMPLETIONS_URL, "body": {"prompt": prompt, **body}}


def moderation(cid: str, text="i will hurt you", **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": C.MODERATIONS_URL, "body": {"input": text, **body}}


def classification(cid: str, text="have a lovely day", **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": C.CLASSIFICATIONS_URL, "body": {"input": text, **body}}


def read_results(client, batch_id, tmp_path) -> tuple[list[dict], list[dict]]:
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    client.download(batch_id, out, err)
    # split on "\n" only: JSON keeps U+2028 and NEL raw, which splitlines() would break at
    return ([json.loads(x) for x in out.read_text().split("\n")[:-1]],
            [json.loads(x) for x in err.read_text().split("\n")[:-1]])


ARTIFACTS = Path(os.environ.get("GRISTMILL_TEST_ARTIFACTS", ROOT / ".state" / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browse(url: str, screenshot: Path) -> str:
    """Load `url` in headless Chromium: keep a screenshot, return the rendered DOM. (.ci/run
    installs Debian's chromium; without one the test says so and skips.)"""
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (`apt-get install chromium`; .ci/run installs it)")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900",
             "--virtual-time-budget=5000"]
    shot = subprocess.run([CHROMIUM, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=90)
    assert screenshot.exists() and screenshot.stat().st_size > 0, shot.stderr.decode()[-2000:]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, timeout=90)
    return dom.stdout.decode()
