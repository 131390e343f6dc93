"""Configuration files in n2disk's style, and the sensor's default dump sets.

`recorder /etc/pcapvault/recorder-eth0.conf` reads one option per line (`--disk-limit=80%`,
`-i=eth0`, `--no-promisc`); options given on the command line come after the file's, so they
win. The other tools find the dump sets of a configured sensor in the same directory, so an
analyst does not have to know where the recorder writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import click

from pcapvault.index.clitypes import OptionalValue
from pcapvault.index.errors import PcapVaultError


class ConfigError(PcapVaultError):
    """A configuration file that cannot be used; the message names the file and line."""


def config_dir() -> Path:
    return Path(os.environ.get("PCAPVAULT_CONFIG_DIR", "/etc/pcapvault"))


def _options(command: click.Command) -> dict[str, click.Option]:
    known = {}
    for p in command.params:
        if isinstance(p, click.Option):
            for name in p.opts + p.secondary_opts:
                known[name] = p
    return known


def config_text(path: Path) -> str:
    """The text of a configuration file: UTF-8 (a leading BOM is ignored) without NUL bytes.

    An ISO-8859-1 or UTF-16 file, or a NUL, is a ConfigError naming the line: read otherwise,
    it would fail later, far from its cause (a traceback, or a path cut at the NUL). OSError
    is the caller's.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8 text; save the file as "
            "UTF-8"
        ) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(
            f"{path}:{line}: a NUL byte (is the file UTF-16?); save the file as UTF-8 text"
        )
    return text


def _unquote(value: str) -> str:
    """`value` without its quotes when it is one quoted string (`"/srv/my pcaps"`); quotes
    that belong to separate words (`"/opt/my tools/ship" "$F"`) are the value's own."""
    q = value[:1]
    if q in ("'", '"') and len(value) >= 2 and value.find(q, 1) == len(value) - 1:
        return value[1:-1]
    return value


def _text(path: Path) -> str:
    try:
        return config_text(path)
    except OSError as e:
        raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from None


def option_lines(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, option name, value or '') of each option line: `NAME=VALUE`,
    `NAME VALUE` or a lone `NAME`, the value unquoted when it is one quoted string."""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(-{1,2}[A-Za-z0-9][\w-]*)(?:\s*=\s*|\s+)?(.*)$", line)
        name, value = (m.group(1), m.group(2).strip()) if m else (line, "")
        yield n, name, _unquote(value)


def read_option_file(path: Path, command: click.Command) -> list[str]:
    """The file's options as command-line arguments, checked against `command`'s options."""
    known = _options(command)
    args: list[str] = []
    for n, name, value in option_lines(_text(path)):
        opt = known.get(name)
        if opt is None:
            raise ConfigError(
                f"{path}:{n}: unknown option {name!r}; see {command.name} --help"
            )
        takes_value = not (opt.is_flag or opt.count)
        if takes_value and not value:
            if not isinstance(opt, OptionalValue):
                raise ConfigError(f"{path}:{n}: option {name} needs a value ({name}=VALUE)")
            # `--compress` alone: the value it stands for, spelled out so that the command
            # line's next argument is never taken for it.
            value = str(opt.alone)
        if not takes_value and value:
            raise ConfigError(f"{path}:{n}: option {name} takes no value")
        args += [name, value] if takes_value else [name]
    return args


def expand_config_args(argv: list[str], command: click.Command) -> list[str]:
    """`CONF [options]`: the file's options first, so the command line overrides them."""
    if argv and not argv[0].startswith("-"):
        return read_option_file(Path(argv[0]), command) + argv[1:]
    return argv


def default_dumpsets() -> list[Path]:
    """Dump sets of this sensor: `dumpset=` lines of pcapvault.conf, else the recorders' -o.

    A recorder configuration without -o records into /var/lib/pcapvault/IFACE.
    """
    d = config_dir()
    found: list[Path] = []
    main = d / "pcapvault.conf"
    if main.exists():
        for line in _text(main).splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "dumpset" and value.strip():
                found.append(Path(_unquote(value.strip())))
        if found:
            return found
    for conf in sorted(d.glob("recorder-*.conf")):
        out = iface = ""
        try:
            text = config_text(conf)
        except OSError:
            continue
        for _, name, value in option_lines(text):
            if name in ("-o", "--dump-dir"):
                out = value
            elif name in ("-i", "--interface"):
                iface = value
        if out or iface:
            found.append(Path(out) if out else Path("/var/lib/pcapvault") / iface)
    return found
