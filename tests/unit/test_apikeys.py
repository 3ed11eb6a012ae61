"""API keys of the HTTP front door: where they come from, what is kept of them, who they make owner."""

import os

import pytest

from gristmill.producers.apikeys import ApiKeys, add_to_file, digest, ensure_local_key, owner_of
from gristmill.producers.errors import ConfigurationError
from gristmill.producers.pages import batches_page

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefghij"


def test_keys_from_the_environment_and_a_file(tmp_path):
    keys_file = tmp_path / "keys"
    made = add_to_file(keys_file, admin=True)
    text = keys_file.read_text()
    assert made not in text and text.startswith("sha256:") and text.rstrip().endswith(" admin")
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    keys_file.write_text(text + f"# a comment\n\n{BOB}\n")
    keys = ApiKeys.from_sources(ALICE, None, keys_file)
    assert len(keys) == 3
    alice, bob, admin = keys.authenticate(ALICE), keys.authenticate(BOB), keys.authenticate(made)
    assert alice.owner == owner_of(digest(ALICE)) and not alice.admin
    assert bob.owner != alice.owner and not bob.admin
    assert admin.admin
    assert keys.authenticate("nope-0123456789abcdef") is None and keys.authenticate("") is None
    assert keys.authenticate(None) is None
    assert ALICE not in alice.owner and len(alice.owner) == len("key_") + 16


def test_admin_keys_are_admin_and_digests_stand_for_keys():
    keys = ApiKeys.from_sources(f"sha256:{digest(ALICE).hex()}", BOB)
    assert not keys.authenticate(ALICE).admin and keys.authenticate(BOB).admin
    assert keys.authenticate(f"sha256:{digest(ALICE).hex()}") is None  # a digest is not itself a key


@pytest.mark.parametrize("bad", ["short", f"{ALICE} owner", f"{ALICE} admin extra"])
def test_a_bad_key_entry_is_refused_naming_where(bad, tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"{BOB}\n{bad}\n")
    with pytest.raises(ConfigurationError, match=r"keys line 2"):
        ApiKeys.from_sources(None, None, f)


def test_a_missing_keys_file_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="GRISTMILL_API_KEYS_FILE"):
        ApiKeys.from_sources(None, None, tmp_path / "absent")


def test_the_local_key_is_made_once_and_kept_private(tmp_path):
    key = ensure_local_key(tmp_path)
    assert ensure_local_key(tmp_path) == key and len(key) > 32
    assert oct(os.stat(tmp_path / "api-key").st_mode & 0o777) == "0o600"


def test_the_batches_page_escapes_what_users_wrote():
    from gristmill.producers.apikeys import Principal
    from gristmill.producers.batches import Batch, RequestCounts
    b = Batch(id="batch_x", status="in_progress", created_at=0, request_counts=RequestCounts(total=4, completed=1, failed=1),
              endpoint="/v1/moderations", policy={"policy_version": "<script>alert(1)</script>", "model": "m"},
              output_file_id="file-o")
    html = batches_page([b], Principal("key_x"))
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert "50%" in html and "/v1/files/file-o/content" in html and "2 / 4" in html
