"""Operations: configuration files, systemd units and system files, --help/--version."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from recorderproc import tool

from pcapvault.index.config import ConfigError, default_dumpsets, read_option_file
from pcapvault.recorder.cli import command

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"


def test_option_file_n2disk_style(tmp_path):
    conf = tmp_path / "recorder-eth0.conf"
    conf.write_text(
        "# sensor 1\n-i=eth0\n--disk-limit=80%\n\n-f = \"not port 22\"\n--no-promisc\n"
        "-p 512M\n"
    )
    assert read_option_file(conf, command) == [
        "-i", "eth0", "--disk-limit", "80%", "-f", "not port 22", "--no-promisc", "-p", "512M",
    ]


def test_option_file_quotes_and_optional_values(tmp_path):
    """Quotes are stripped only around one quoted string, and an option whose value is
    optional on the command line (`--compress [LEVEL]`) may stand alone on its line."""
    conf = tmp_path / "recorder-eth0.conf"
    conf.write_text(
        '-i=eth0\n--exec-cmd="/opt/my tools/ship" "$PCAPVAULT_PCAP"\n--compress\n'
        "-o='/srv/my pcaps'\n"
    )
    args = read_option_file(conf, command)
    assert args == ["-i", "eth0", "--exec-cmd", '"/opt/my tools/ship" "$PCAPVAULT_PCAP"',
                    "--compress", "3", "-o", "/srv/my pcaps"]
    ctx = command.make_context("recorder", [*args, "--usec"])
    assert ctx.params["compress"] == 3 and ctx.params["usec"]
    conf.write_text("-i=eth0\n--compress=9\n")
    assert command.make_context("recorder", read_option_file(conf, command)).params[
        "compress"] == 9


@pytest.mark.parametrize(
    "text, message",
    [
        ("-i=eth0\n--bogus=1\n", ":2: unknown option '--bogus'"),
        ("--usec=yes\n", ":1: option --usec takes no value"),
        ("\n\n--disk-limit\n", ":3: option --disk-limit needs a value"),
    ],
)
def test_option_file_errors_name_the_line(tmp_path, text, message):
    conf = tmp_path / "r.conf"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_option_file(conf, command)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"-i=eth0\n-o=/srv/caf\xe9\n", ":2: byte 0xe9 is not UTF-8 text"),  # ISO-8859-1
        ("-i=eth0\n".encode("utf-16"), ":1: byte 0xff is not UTF-8 text"),  # with its BOM
        ("-i=eth0\n".encode("utf-16-le"), ":1: a NUL byte"),
        (b"-i=eth0\n\n-o=/srv/a\x00b\n", ":3: a NUL byte"),
    ],
)
def test_option_file_not_utf8_text(tmp_path, data, message):
    conf = tmp_path / "r.conf"
    conf.write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        read_option_file(conf, command)
    # Through every tool that reads one: one line, usage error, no traceback.
    for cmd in ([tool("recorder"), str(conf)], [tool("disk2n"), str(conf)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    (tmp_path / "pcapvault.conf").write_bytes(data.replace(b"-o=", b"dumpset="))
    r = subprocess.run([tool("npcapextract"), "-b", "-1h", "-e", "now", "-O"],
                       capture_output=True, text=True,
                       env={**os.environ, "PCAPVAULT_CONFIG_DIR": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("npcapextract: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_option_file_may_start_with_a_utf8_bom(tmp_path):
    conf = tmp_path / "r.conf"
    conf.write_bytes("\ufeff-i=eth0\n-o=/srv/café\n".encode())
    assert read_option_file(conf, command) == ["-i", "eth0", "-o", "/srv/café"]


def test_command_line_overrides_the_file(tmp_path):
    conf = tmp_path / "r.conf"
    conf.write_text(f"-i=nosuch0\n-o={tmp_path / 'ds'}\n--disk-limit=1GB\n")
    # The file's interface is wrong, but the command line's wins; its tiny limit is what fails.
    r = subprocess.run([tool("recorder"), str(conf), "-i", "lo", "--disk-limit", "1MB"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "cannot hold even one" in r.stderr and "nosuch0" not in r.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("-i=lo\n--frobnicate\n")
    r = subprocess.run([tool("recorder"), str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"recorder: error: {bad}:2: unknown option '--frobnicate'; see recorder --help"
    )


def test_default_dumpsets(tmp_path, monkeypatch):
    monkeypatch.setenv("PCAPVAULT_CONFIG_DIR", str(tmp_path))
    assert default_dumpsets() == []
    (tmp_path / "recorder-eth0.conf").write_text("-i=eth0\n")
    (tmp_path / "recorder-eth1.conf").write_text("-i=eth1\n-o=/srv/pcap/eth1\n")
    assert default_dumpsets() == [Path("/var/lib/pcapvault/eth0"), Path("/srv/pcap/eth1")]
    # Read as the recorder reads them: quotes stripped, paths with spaces whole.
    (tmp_path / "recorder-eth2.conf").write_text('-i=eth2\n-o="/srv/my pcaps/eth2"\n')
    (tmp_path / "recorder-eth3.conf").write_text("--dump-dir '/srv/x y'\n--compress\n")
    assert default_dumpsets() == [Path("/var/lib/pcapvault/eth0"), Path("/srv/pcap/eth1"),
                                  Path("/srv/my pcaps/eth2"), Path("/srv/x y")]
    (tmp_path / "pcapvault.conf").write_text('# explicit wins\ndumpset=/data/ds\n'
                                             'dumpset = "/data/ds 2"\n')
    assert default_dumpsets() == [Path("/data/ds"), Path("/data/ds 2")]


def units() -> list[Path]:
    return sorted(p for p in SYSTEMD.iterdir() if p.suffix in (".service", ".socket", ".timer"))


def installed_text(unit: Path) -> str:
    """The unit as setup.sh installs it, its tools taken from this test's installation
    (setup.sh links them into /usr/local/bin; a tool new to this tree is not there yet)."""
    text = unit.read_text()
    for line in text.splitlines():
        if line.startswith("ExecStart=/usr/local/bin/"):
            name = line.split("/usr/local/bin/", 1)[1].split()[0]
            text = text.replace(f"/usr/local/bin/{name}", tool(name))
    return text


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_units_verify(tmp_path):
    assert "npcapserve.service" in {u.name for u in units()}, "systemd/ ships the units"
    for unit in units():
        # Under its own name too: a socket with Accept=yes is checked against its template.
        (tmp_path / unit.name).write_text(installed_text(unit))
    for unit in units():
        # A template is verified through an instance of it.
        name = unit.name.replace("@.", "@eth0.")
        target = tmp_path / name
        target.write_text(installed_text(unit))
        r = subprocess.run(["systemd-analyze", "verify", str(target)],
                           capture_output=True, text=True)
        problems = [line for line in r.stderr.splitlines()
                    if name in line or "Unknown" in line or "Failed" in line]
        assert r.returncode == 0 and not problems, r.stderr


@pytest.mark.skipif(not shutil.which("systemd-sysusers"), reason="systemd-sysusers missing")
def test_sysusers_and_tmpfiles_parse(tmp_path):
    (tmp_path / "etc").mkdir()
    r = subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                        str(SYSTEMD / "sysusers.d" / "pcapvault.conf")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "ignoring" not in r.stderr, r.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    assert passwd.startswith("pcapvault:") and "npcap:" in group
    r = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                        str(SYSTEMD / "tmpfiles.d" / "pcapvault.conf")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
    st = (tmp_path / "var" / "lib" / "pcapvault").stat()
    assert oct(st.st_mode & 0o777) == "0o750"
    uid = int(passwd.split(":")[2])
    assert st.st_uid == uid


def test_pam_file_uses_pam_unix():
    text = (SYSTEMD / "pam.d" / "npcapextract").read_text()
    assert "auth" in text and "pam_unix.so" in text and "account" in text


@pytest.mark.parametrize("prog", ["recorder", "npcapextract", "npcapindex", "npcapprintindex",
                                  "npcaprepair", "npcapdecompress", "disk2n", "npcapextractd"])
def test_help_and_version(prog):
    r = subprocess.run([tool(prog), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Examples:" in r.stdout
    r = subprocess.run([tool(prog), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "0.1.0" in r.stdout
