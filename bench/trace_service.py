"""Where the time of an extraction through the service goes: a timeline per process.

Diagnostic, not a benchmark (it changes what it measures: the client imports the engine at
start-up, which delays its early connection). `install` puts a site hook into the venv that
bench/service.py runs (every interpreter of that venv then records, into /tmp/pvtrace, the
times of its O_DIRECT reads, waits for them and for acknowledgements, and the client's
writes); run the benchmark with a few repeats; `report` prints one line per extraction;
`remove` takes the hook out again (do not leave it in).

    python bench/trace_service.py install /opt/pcapvault/bin/python
    /opt/pcapvault/bin/python bench/service.py --gb 1 --repeat 4 --cold --out-dir /dev/shm
    python bench/trace_service.py report
    python bench/trace_service.py remove /opt/pcapvault/bin/python
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

TRACE_DIR = Path("/tmp/pvtrace")
HOOK = "pcapvault_trace_hook"

HOOK_SOURCE = '''
import os, sys

def _install():
    import atexit, json, time
    boot = time.perf_counter()
    from pcapvault.extract import direct, engine
    from pcapvault.extract.service import client, shared
    events = []

    def wrap(owner, name, tag):
        f = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                events.append((tag, t, time.perf_counter()))
        setattr(owner, name, timed)

    wrap(direct, "_read_all", "read")
    wrap(direct.Span, "result", "wait_read")
    wrap(shared.SharedSlots, "_await_ack", "wait_ack")
    wrap(client._Receiver, "copy_shared", "write")
    wrap(client._Receiver, "copy", "copy")
    wrap(engine, "extract", "extract")
    events.append(("start", boot, boot))
    name = "%s/ev-%d-%s.json" % ("TRACE_DIR", os.getpid(), os.path.basename(sys.argv[0]))

    def dump():
        with open(name, "w") as f:
            json.dump(events, f)
    atexit.register(dump)
    real_exit = os._exit

    def leave(code):
        dump()
        real_exit(code)
    os._exit = leave

if os.path.isdir("TRACE_DIR"):
    try:
        _install()
    except Exception as e:
        print("trace hook:", e, file=sys.stderr)
'''.replace("TRACE_DIR", str(TRACE_DIR))


def site_dir(python: str) -> Path:
    out = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip())


def install(python: str) -> None:
    d = site_dir(python)
    (d / f"{HOOK}.py").write_text(HOOK_SOURCE)
    (d / f"{HOOK}.pth").write_text(f"import {HOOK}\n")
    TRACE_DIR.mkdir(exist_ok=True)
    TRACE_DIR.chmod(0o1777)  # the service account and the test user write here too
    for f in TRACE_DIR.glob("ev-*.json"):
        f.unlink()


def remove(python: str) -> None:
    d = site_dir(python)
    for suffix in (".py", ".pth"):
        (d / f"{HOOK}{suffix}").unlink(missing_ok=True)
    for cached in (d / "__pycache__").glob(f"{HOOK}.*.pyc"):
        cached.unlink()  # harmless without its source, but nothing of the hook may stay


def report() -> None:
    def pid(f: str) -> int:
        return int(Path(f).name.split("-")[1])

    runs = []
    for f in sorted(glob.glob(str(TRACE_DIR / "ev-*.json")), key=pid):
        ev = json.loads(Path(f).read_text())
        if any(e[0] in ("read", "write", "copy") for e in ev):
            runs.append((Path(f).name, ev))

    def first(ev, k):
        return min((e[1] for e in ev if e[0] == k), default=float("nan"))

    def last(ev, k):
        return max((e[2] for e in ev if e[0] == k), default=float("nan"))

    def total(ev, k):
        return sum(e[2] - e[1] for e in ev if e[0] == k)

    i = 0
    while i < len(runs):
        name, ev = runs[i]
        t0 = first(ev, "start")
        if "npcapextractd" in (runs[i + 1][0] if i + 1 < len(runs) else ""):
            sv = runs[i + 1][1]
            print(f"service: reads {first(sv, 'read') - t0:.3f}-{last(sv, 'read') - t0:.3f} s "
                  f"(reading {total(sv, 'read'):.3f} s, waiting for reads "
                  f"{total(sv, 'wait_read'):.3f} s, for acknowledgements "
                  f"{total(sv, 'wait_ack'):.3f} s); client writes "
                  f"{first(ev, 'write') - t0:.3f}-{last(ev, 'write') - t0:.3f} s "
                  f"({total(ev, 'write'):.3f} s); client ends {max(e[2] for e in ev) - t0:.3f} s")
            i += 2
            continue
        if any(e[0] == "read" for e in ev):
            print(f"direct:  reads {first(ev, 'read') - t0:.3f}-{last(ev, 'read') - t0:.3f} s "
                  f"(reading {total(ev, 'read'):.3f} s, waiting for reads "
                  f"{total(ev, 'wait_read'):.3f} s); ends {max(e[2] for e in ev) - t0:.3f} s")
        i += 1


def main() -> None:
    cmd = sys.argv[1:2]
    if cmd == ["install"] and len(sys.argv) == 3:
        install(sys.argv[2])
    elif cmd == ["remove"] and len(sys.argv) == 3:
        remove(sys.argv[2])
    elif cmd == ["report"]:
        report()
    else:
        sys.exit("usage: trace_service.py install PYTHON | report | remove PYTHON")


if __name__ == "__main__":
    main()
