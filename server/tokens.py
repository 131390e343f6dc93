"""API tokens for scripts: `pvt_<id>_<secret>`, shown once, stored only as a hash.

A token acts as its user: the Gate checks that user's groups at every request, so removing
the user from the extractors' group (or deleting the account) takes effect at once, and
revoking the token too: a running server re-reads the file whenever it changes.

The secret is 256 random bits, so a plain SHA-256 of it is as strong as a slow password
hash would be (nothing to brute-force), and costs nothing per request. The file holds one
JSON document, replaced atomically (mode 0640, the group of its directory, so that the
service account can read what root writes); writers take a lock on the directory so that
two `npcapserve token` commands at once cannot lose each other's change.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import pwd
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from pcapvault.index.atomicfile import atomic_write
from pcapvault.index.errors import PcapVaultError

TOKENS_PATH = Path("/var/lib/pcapvault/npcapserve/tokens")
PREFIX = "pvt"
_TOKEN = re.compile(r"pvt_([0-9a-f]{12})_([0-9a-f]{64})")
_ID = re.compile(r"[0-9a-f]{12}")
MAX_NOTE = 200
FILE_MODE = 0o640
FORMAT_VERSION = 1


class TokenFileError(PcapVaultError):
    """The tokens file cannot be read or is not ours."""


@dataclass(frozen=True)
class TokenInfo:
    """What `token list` shows: never the secret, nor its hash."""

    id: str
    user: str
    created: int  # seconds since the epoch
    note: str


@dataclass(frozen=True)
class _Stored:
    info: TokenInfo
    sha256: str


class TokenStore:
    """The tokens file at `path`, re-read when it changes (inode, size or mtime)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: dict[str, _Stored] = {}
        self._lock = threading.Lock()

    def create(self, user: str, note: str = "") -> str:
        """A new token for `user`; the only time its secret is seen."""
        tid, secret = secrets.token_hex(6), secrets.token_hex(32)
        with self._changing() as tokens:
            while tid in tokens:
                tid = secrets.token_hex(6)
            tokens[tid] = _Stored(TokenInfo(tid, user, int(time.time()), note), _digest(secret))
        return f"{PREFIX}_{tid}_{secret}"

    def list(self) -> list[TokenInfo]:
        """Every token, oldest first."""
        with self._lock:
            tokens = self._current()
        return sorted((t.info for t in tokens.values()), key=lambda i: (i.created, i.id))

    def revoke(self, tid: str) -> bool:
        """Remove the token with this id; False if there is none."""
        with self._changing() as tokens:
            return tokens.pop(tid, None) is not None

    def lookup(self, token: str) -> str | None:
        """The user `token` acts as, or None when it is malformed, unknown or revoked."""
        m = _TOKEN.fullmatch(token)
        if m is None:
            return None
        with self._lock:
            stored = self._current().get(m[1])
        # Compared even for an unknown id, so the answer's timing says nothing about ids.
        want = stored.sha256 if stored else "0" * 64
        if not hmac.compare_digest(_digest(m[2]), want) or stored is None:
            return None
        return stored.info.user

    def _current(self) -> dict[str, _Stored]:
        """The tokens as the file now holds them (the caller holds self._lock)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._tokens = None, {}
            return self._tokens
        except OSError as e:
            raise TokenFileError(f"cannot read the tokens file {self.path}: {e.strerror}"
                                 ) from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._tokens = _load(self.path)
            self._stamp = stamp
        return self._tokens

    @contextmanager
    def _changing(self) -> Iterator[dict[str, _Stored]]:
        """The tokens to change in place; written back atomically on leaving."""
        folder = self.path.parent
        try:
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TokenFileError(f"the directory {folder} does not exist: create it "
                                 "(setup.sh --system does) or give --tokens") from None
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            with self._lock:
                tokens = dict(self._current())
                yield tokens
                body = {"version": FORMAT_VERSION,
                        "tokens": [{**asdict(t.info), "sha256": t.sha256}
                                   for t in tokens.values()]}
                group = os.fstat(dfd).st_gid
                with atomic_write(self.path, mode=FILE_MODE) as f:
                    if group != os.getegid():
                        os.fchown(f.fileno(), -1, group)
                    f.write((json.dumps(body, indent=1) + "\n").encode())
        finally:
            os.close(dfd)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _load(path: Path) -> dict[str, _Stored]:
    try:
        data = json.loads(path.read_bytes())
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {FORMAT_VERSION}")
        tokens = {}
        for t in data["tokens"]:
            info = TokenInfo(str(t["id"]), str(t["user"]), int(t["created"]), str(t["note"]))
            tokens[info.id] = _Stored(info, str(t["sha256"]))
        return tokens
    except OSError as e:
        raise TokenFileError(f"cannot read the tokens file {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TokenFileError(f"the tokens file {path} is damaged ({type(e).__name__}: {e}); "
                             "restore it from a backup or remove it (every token is then "
                             "revoked)") from None


# `npcapserve token ...`: the app's command group adds this one.

def _user(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        pwd.getpwnam(value)
    except KeyError:
        raise click.BadParameter(f"no user named {value!r} on this system") from None
    return value


def _note(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if len(value) > MAX_NOTE or not value.isprintable():
        raise click.BadParameter(f"at most {MAX_NOTE} printable characters, on one line")
    return value


def _token_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not _ID.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a token id (12 hex digits, as "
                                 "`token list` shows them)")
    return value


@click.group("token", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tokens", "path", type=click.Path(dir_okay=False, path_type=Path),
              default=TOKENS_PATH, show_default=True, help="The tokens file.")
@click.pass_context
def token_cli(ctx: click.Context, path: Path) -> None:
    """API tokens for scripts: each acts as its user (Authorization: Bearer TOKEN)."""
    ctx.obj = TokenStore(path)


@token_cli.command("create")
@click.argument("user", callback=_user)
@click.option("--note", default="", callback=_note, help="What the token is for.")
@click.pass_obj
def _create(store: TokenStore, user: str, note: str) -> None:
    """Make a token for USER and print it: it is shown only this once."""
    click.echo(store.create(user, note))


@token_cli.command("list")
@click.pass_obj
def _list(store: TokenStore) -> None:
    """The tokens: id, user, creation time (UTC), note; never a secret."""
    for t in store.list():
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.created))
        click.echo(f"{t.id}  {t.user}  {created}  {t.note}".rstrip())


@token_cli.command("revoke")
@click.argument("tid", metavar="ID", callback=_token_id)
@click.pass_obj
def _revoke(store: TokenStore, tid: str) -> None:
    """Revoke the token ID: a running server refuses it from its next request."""
    if not store.revoke(tid):
        raise TokenFileError(f"no token with id {tid} (see `npcapserve token list`)")


def main() -> None:
    """`npcapserve token` on its own (the tests run it so)."""
    from pcapvault.index.cliutil import run

    run(token_cli, "npcapserve token")
