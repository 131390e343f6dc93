"""`--exec-cmd`: a command run for every closed file once it is indexed and linked.

Teams feed closed files to Zeek, Suricata or an archive (n2disk's --exec-cmd). The capture
loop only starts commands and looks at them between ring blocks, never waits for one: at most
`max_running` run at once, the rest wait in a bounded queue (a file that finds it full is
skipped, logged and counted), and a command running longer than `timeout` is killed with its
process group. A command ends when its shell does: what it left running in its process
group (`cmd &`) is killed then, so that --exec-max and --exec-timeout bound all of its work
(a command meant to outlive it leaves the group with setsid). Commands run as the recorder's
account (the capture process has dropped its privileges before any is started), with stdin
from /dev/null and their output on the recorder's stderr (the journal), and learn about their
file from the environment:

  PCAPVAULT_PCAP      the pcap (or .pcap.zst) file
  PCAPVAULT_INDEX     its index
  PCAPVAULT_DUMPSET   the dump set directory
  PCAPVAULT_FIRST_NS  the first packet's time, integer nanoseconds since the epoch
  PCAPVAULT_LAST_NS   the last packet's time, likewise
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from pcapvault.index.dumpset import StoredFile
from pcapvault.index.errors import FormatError
from pcapvault.index.postings import HEADER_LEN, parse_header

log = logging.getLogger("pcapvault.recorder")

# Files waiting for a free slot; beyond it (a hook far slower than the recording) files are
# skipped rather than kept in memory without end.
QUEUE_MAX = 1000
# At exit, what runs and waits gets at most this long (or one --exec-timeout if shorter): the
# unit's TimeoutStopSec must cover it after the indexer's own wait.
EXIT_WAIT = 20.0


@dataclass
class _Run:
    proc: subprocess.Popen
    sf: StoredFile
    started: float
    killed: bool = False


class FileHook:
    """Runs `cmd` (via /bin/sh -c) for each submitted file; `poll` does all the waiting."""

    def __init__(self, cmd: str, dumpset: Path, max_running: int = 2, timeout: float = 600.0,
                 queue_max: int = QUEUE_MAX):
        self.cmd = cmd
        self.dumpset = dumpset
        self.max_running = max_running
        self.timeout = timeout
        self.queue: deque[StoredFile] = deque()
        self.queue_max = queue_max
        self.running: list[_Run] = []
        self.started = self.failed = self.killed = self.skipped = 0

    def submit(self, sf: StoredFile) -> None:
        if len(self.queue) >= self.queue_max:
            self.skipped += 1
            log.warning("--exec-cmd: %d files already wait for the command; not run for %s "
                        "(%d skipped so far)", len(self.queue), sf.name, self.skipped)
            return
        self.queue.append(sf)
        self.poll()

    def poll(self) -> None:
        """Reap finished commands, kill overdue ones, start waiting ones; never blocks."""
        now = time.monotonic()
        still = []
        for r in self.running:
            rc = self._ended(r)
            if rc is None:
                if not r.killed and now - r.started > self.timeout:
                    log.error("--exec-cmd for %s still runs after %g s: killing it",
                              r.sf.name, self.timeout)
                    self._kill(r.proc)
                    r.killed = True
                    self.killed += 1
                still.append(r)
            elif rc != 0 and not r.killed:
                self.failed += 1
                how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
                log.error("--exec-cmd for %s failed (%s)", r.sf.name, how)
        self.running = still
        while self.queue and len(self.running) < self.max_running:
            self._start(self.queue.popleft(), now)

    def _start(self, sf: StoredFile, now: float) -> None:
        env = dict(os.environ, PCAPVAULT_PCAP=str(sf.pcap), PCAPVAULT_INDEX=str(sf.index),
                   PCAPVAULT_DUMPSET=str(self.dumpset))
        try:
            with open(sf.index, "rb") as f:
                h = parse_header(f.read(HEADER_LEN), str(sf.index))
            env.update(PCAPVAULT_FIRST_NS=str(h.first_ns), PCAPVAULT_LAST_NS=str(h.last_ns))
        except (OSError, FormatError) as e:
            log.error("--exec-cmd: not run for %s: its index cannot be read (%s)", sf.name, e)
            self.failed += 1
            return
        try:
            # Its own process group, so a timeout kills whatever the shell started too.
            proc = subprocess.Popen(["/bin/sh", "-c", self.cmd], stdin=subprocess.DEVNULL,
                                    stdout=2, env=env, start_new_session=True)
        except OSError as e:
            log.error("--exec-cmd: cannot run /bin/sh for %s: %s", sf.name, e.strerror)
            self.failed += 1
            return
        self.started += 1
        self.running.append(_Run(proc, sf, now))

    def _ended(self, r: _Run) -> int | None:
        """The exit status of `r`'s shell, None while it runs. Before the shell is reaped
        (its number still names its group, so no other group can be hit), whatever it left
        running in its group is killed."""
        try:
            if not os.waitid(os.P_PID, r.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return None
        except ChildProcessError:  # reaped already
            return r.proc.poll()
        left = 0 if r.killed else _members(r.proc.pid)
        if left:
            log.warning("--exec-cmd for %s left %d process(es) running when it exited: "
                        "killed (a command must finish its work before it exits)",
                        r.sf.name, left)
            self._kill(r.proc)
        return r.proc.wait()

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """At exit: finish what runs and waits, for at most EXIT_WAIT (or one timeout); then
        kill what still runs and name the files left without a run (a hanging command must
        not keep the recorder from stopping)."""
        if self.queue or self.running:
            log.info("waiting for --exec-cmd: %d running, %d waiting", len(self.running),
                     len(self.queue))
        end = time.monotonic() + min(self.timeout, EXIT_WAIT)
        while (self.queue or self.running) and time.monotonic() < end:
            self.poll()
            time.sleep(0.05)
        for r in self.running:
            self._kill(r.proc)
            r.proc.wait()
        left = [r.sf.name for r in self.running] + [sf.name for sf in self.queue]
        if left:
            self.skipped += len(self.queue)
            self.killed += len(self.running)
            log.error("--exec-cmd: stopping; not run to the end for %d files: %s", len(left),
                      " ".join(left))
        self.running, self.queue = [], deque()


def _members(pgid: int) -> int:
    """How many processes other than its leader are in the process group `pgid` (/proc)."""
    n = 0
    for e in os.scandir("/proc"):
        if not e.name.isdigit() or int(e.name) == pgid:
            continue
        try:
            with open(f"/proc/{e.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        n += int(fields[2]) == pgid  # after the name: state, ppid, pgrp
    return n
