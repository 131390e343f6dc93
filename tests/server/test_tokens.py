"""API tokens: shown once, stored as a hash, seen by a running server without restart, and
`npcapserve token` (create, list, revoke) failing in one line."""

from __future__ import annotations

import grp
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from authworld import TOKEN_CLI

from pcapvault.server.tokens import TokenFileError, TokenStore

USER = "root"  # an account every system has; the store itself does not care who


def cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOKEN_CLI, "--tokens", str(path), *args], capture_output=True,
                          text=True, timeout=30)


def test_a_token_is_shown_once_and_stored_as_a_hash(tmp_path):
    store = TokenStore(tmp_path / "tokens")
    token = store.create(USER, "nightly SOAR pull")
    m = re.fullmatch(r"pvt_([0-9a-f]{12})_([0-9a-f]{64})", token)
    assert m
    text = store.path.read_text()
    assert m[2] not in text and m[1] in text and "nightly SOAR pull" in text
    assert store.path.stat().st_mode & 0o777 == 0o640
    assert store.lookup(token) == USER
    [info] = store.list()
    assert (info.id, info.user, info.note) == (m[1], USER, "nightly SOAR pull")
    assert m[2] not in repr(info)


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1] + ("0" if t[-1] != "0" else "1"),  # wrong secret
    lambda t: t.replace(t[4:16], "0" * 12),  # another id
    lambda t: t + "0", lambda t: t.upper(), lambda t: "", lambda t: t.replace("pvt_", "xyz_"),
])
def test_anything_but_the_token_is_refused(tmp_path, mangle):
    store = TokenStore(tmp_path / "tokens")
    token = store.create(USER)
    assert store.lookup(mangle(token)) is None


def test_a_running_store_sees_creation_and_revocation(tmp_path):
    server = TokenStore(tmp_path / "tokens")
    assert server.lookup("pvt_000000000000_" + "0" * 64) is None  # no file yet
    operator = TokenStore(tmp_path / "tokens")
    token = operator.create(USER)
    assert server.lookup(token) == USER
    other = operator.create(USER)
    assert operator.revoke(token.split("_")[1])
    assert server.lookup(token) is None and server.lookup(other) == USER
    assert not operator.revoke(token.split("_")[1])
    assert [i.id for i in server.list()] == [other.split("_")[1]]


def test_the_file_takes_its_directory_group(tmp_path):
    """Root writes it, the service account (the directory's group) reads it."""
    gid = grp.getgrnam("daemon").gr_gid if os.geteuid() == 0 else os.getegid()
    os.chown(tmp_path, -1, gid)
    store = TokenStore(tmp_path / "tokens")
    store.create(USER)
    assert store.path.stat().st_gid == gid


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two `token create` at once each keep the other's token (the directory lock)."""
    path = tmp_path / "tokens"
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: cli(path, "create", USER), range(12)))
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    store = TokenStore(path)
    assert all(store.lookup(r.stdout.strip()) == USER for r in runs)


def test_a_damaged_file_is_an_error_not_an_empty_store(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(json.dumps({"version": 1, "tokens": [{"id": "x"}]}))
    with pytest.raises(TokenFileError, match="damaged"):
        TokenStore(path).lookup("pvt_000000000000_" + "0" * 64)
    with pytest.raises(TokenFileError, match="damaged"):
        TokenStore(path).create(USER)  # and nothing is overwritten
    assert json.loads(path.read_text())["tokens"] == [{"id": "x"}]


def test_cli_create_list_revoke(tmp_path):
    path = tmp_path / "tokens"
    r = cli(path, "create", USER, "--note", "for the IDS console")
    assert r.returncode == 0 and r.stderr == ""
    token = r.stdout.strip()
    tid, secret = token.split("_")[1:]
    r = cli(path, "list")
    assert r.returncode == 0
    [line] = r.stdout.splitlines()
    assert re.fullmatch(rf"{tid}  {USER}  \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ  for the IDS console",
                        line)
    assert secret not in r.stdout
    assert cli(path, "revoke", tid).returncode == 0
    assert cli(path, "list").stdout == ""
    assert TokenStore(path).lookup(token) is None


@pytest.mark.parametrize("args, code, says", [
    (["create", "pvt-no-such-user"], 2, "no user named"),
    (["create", USER, "--note", "two\nlines"], 2, "printable"),
    (["create"], 2, "Missing argument"),
    (["revoke", "not-an-id"], 2, "not a token id"),
    (["revoke", "0123456789ab"], 1, "no token with id 0123456789ab"),
    (["frobnicate"], 2, "No such command"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, code, says):
    r = cli(tmp_path / "tokens", *args)
    assert r.returncode == code
    assert says in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_runtime_errors_are_one_line(tmp_path):
    for path, says in ((tmp_path / "missing" / "tokens", "does not exist"),
                       (tmp_path / "damaged", "damaged")):
        (tmp_path / "damaged").write_text("{")
        r = cli(path, "create", USER)
        assert r.returncode == 1 and says in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1
