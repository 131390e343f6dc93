"""The fleet's configuration file: the sensors, how to trust them, their tokens, the catalogue.

One TOML file (default /etc/pcapvault/fleet.toml, docs/FLEET.md), readable by its owner only,
since it holds the sensors' API tokens and the ClickHouse password: credentials never go on
a command line, where `ps` and shell histories would show them.

    catalogue = "/var/lib/pcapvault/fleet"       # a directory (chdb) or https://host:8443
    retention_days = 30                          # the catalogue's TTL
    timeout = 60                                 # seconds a sensor has for each next whole thing

    [clickhouse]                                 # only for an https:// catalogue
    user = "fleet"
    password = "..."
    database = "pcapvault"
    ca = "/etc/pcapvault/clickhouse-ca.pem"

    [[sensor]]
    name = "dc1"
    url = "https://sensor1.example:8443"
    ca = "/etc/pcapvault/fleet/dc1.pem"          # the CA (or self-signed certificate), or
    # fingerprint = "sha256:4F:2A:..."           # the SHA-256 of the sensor's certificate
    token = "pv1_..."                            # npcapserve token create fleet
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pcapvault.index.cliutil import is_loopback
from pcapvault.index.errors import PcapVaultError

DEFAULT_PATH = Path("/etc/pcapvault/fleet.toml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_FINGERPRINT = re.compile(r"^(?:sha256:)?((?:[0-9A-Fa-f]{2}:?){32})$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class FleetFileError(PcapVaultError):
    """The fleet file is missing, unreadable or wrong: the message names the key."""


@dataclass(frozen=True)
class Sensor:
    """One npcapserve: its name in the catalogue and in pcapng interface names."""

    name: str
    url: str
    token: str = field(repr=False)
    ca: Path | None = None
    fingerprint: bytes | None = None  # SHA-256 of the certificate (DER)


@dataclass(frozen=True)
class ClickHouse:
    """How to log in to a ClickHouse server catalogue."""

    user: str = "default"
    password: str = field(default="", repr=False)
    database: str = "pcapvault"
    ca: Path | None = None


@dataclass(frozen=True)
class FleetConfig:
    sensors: tuple[Sensor, ...]
    catalogue: str | None = None
    retention_days: int = 30
    timeout: float = 60.0
    clickhouse: ClickHouse = ClickHouse()

    def sensor(self, name: str) -> Sensor:
        for s in self.sensors:
            if s.name == name:
                return s
        raise FleetFileError(f"no sensor {name!r} in the fleet file")


def load(path: Path) -> FleetConfig:
    """Read and check the fleet file; refuse one that others may read (it holds tokens)."""
    try:
        st = path.stat()
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FleetFileError(f"{path}: no such fleet file; write one (docs/FLEET.md) or give "
                          "--config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FleetFileError(f"{path}: not a TOML fleet file: {e}") from None
    except OSError as e:
        raise FleetFileError(f"{path}: cannot read the fleet file: {e.strerror}") from None
    if st.st_mode & 0o037:  # group write or execute, anything for others
        raise FleetFileError(f"{path}: it holds API tokens, yet others may read or change it; "
                          f"chmod 600 {path} (or 640 for a group of operators)")
    base = path.parent

    def where(key: str) -> str:
        return f"{path}: {key}"

    known = {"catalogue", "retention_days", "timeout", "clickhouse", "sensor"}
    for k in data:
        if k not in known:
            raise FleetFileError(f"{where(k)}: unknown key; the keys are "
                                 f"{', '.join(sorted(known))}")
    sensors = []
    for i, s in enumerate(data.get("sensor", [])):
        sensors.append(_sensor(s, f"{path}: sensor {i + 1}", base))
    if not sensors:
        raise FleetFileError(f"{path}: no [[sensor]]; name at least one (docs/FLEET.md)")
    names = [s.name for s in sensors]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise FleetFileError(f"{path}: sensor name {sorted(dup)[0]!r} given twice")
    days = data.get("retention_days", 30)
    if not isinstance(days, int) or not 1 <= days <= 3650:
        raise FleetFileError(f"{where('retention_days')}: give whole days, 1 to 3650")
    timeout = data.get("timeout", 60)
    if not isinstance(timeout, int | float) or not 1 <= timeout <= 3600:
        raise FleetFileError(f"{where('timeout')}: give seconds, 1 to 3600")
    ch = data.get("clickhouse", {})
    if not isinstance(ch, dict) or set(ch) - {"user", "password", "database", "ca"}:
        raise FleetFileError(f"{where('clickhouse')}: give user, password, database and ca only")
    database = ch.get("database", "pcapvault")
    if not isinstance(database, str) or not _IDENT.match(database):
        raise FleetFileError(f"{where('clickhouse.database')}: give a plain name (letters, "
                             "digits, _)")
    catalogue = data.get("catalogue")
    if catalogue is not None and not isinstance(catalogue, str):
        raise FleetFileError(f"{where('catalogue')}: give a directory or an https:// URL")
    if catalogue is not None and "://" in catalogue:
        check_url(catalogue, where("catalogue"))
    return FleetConfig(
        tuple(sensors), _relative(catalogue, base), days, float(timeout),
        ClickHouse(str(ch.get("user", "default")), str(ch.get("password", "")), database,
                   _path(ch.get("ca"), base, where("clickhouse.ca"))))


def _sensor(s: object, where: str, base: Path) -> Sensor:
    if not isinstance(s, dict):
        raise FleetFileError(f"{where}: give name, url, token and ca or fingerprint")
    unknown = set(s) - {"name", "url", "token", "ca", "fingerprint"}
    if unknown:
        raise FleetFileError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name = s.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise FleetFileError(f"{where}: name: give letters, digits, '.', '_' or '-' (at most 63)")
    where = f"{where} ({name})"
    url = s.get("url")
    if not isinstance(url, str):
        raise FleetFileError(f"{where}: url: give https://HOST:PORT")
    check_url(url, f"{where}: url")
    token = s.get("token")
    if not isinstance(token, str) or not token.strip():
        raise FleetFileError(f"{where}: token: give the sensor's API token "
                          "(npcapserve token create USER on the sensor)")
    fingerprint = None
    if "fingerprint" in s:
        m = _FINGERPRINT.match(str(s["fingerprint"]).strip())
        if not m:
            raise FleetFileError(f"{where}: fingerprint: give the certificate's SHA-256 as 64 hex "
                              "digits (openssl x509 -noout -fingerprint -sha256 -in cert.pem)")
        fingerprint = bytes.fromhex(m.group(1).replace(":", ""))
    ca = _path(s.get("ca"), base, f"{where}: ca")
    if ca is not None and fingerprint is not None:
        raise FleetFileError(f"{where}: give ca or fingerprint, not both")
    return Sensor(name, url.rstrip("/"), token.strip(), ca, fingerprint)


def check_url(url: str, where: str) -> None:
    """FleetFileError unless `url` is https://HOST[:PORT][/PATH] without a user or password
    in it, or plain http to a loopback address (credentials go over it)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is none
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme not in ("https", "http") or not parts.hostname
            or parts.username is not None or parts.password is not None or parts.query
            or parts.fragment or re.search(r"\s", url) or port == 0):
        raise FleetFileError(f"{where}: give https://HOST:PORT (no user or password in it), "
                             f"not {url[:80]!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise FleetFileError(f"{where}: plain http only to a loopback address (credentials go "
                             "over it); use https")


def _path(value: object, base: Path, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise FleetFileError(f"{where}: give a file name")
    p = Path(value) if os.path.isabs(value) else base / value
    if not p.is_file():
        raise FleetFileError(f"{where}: {p}: no such file")
    return p


def _relative(catalogue: str | None, base: Path) -> str | None:
    """A catalogue directory relative to the fleet file; a URL as it is."""
    if catalogue is None or "://" in catalogue or os.path.isabs(catalogue):
        return catalogue
    return str(base / catalogue)
