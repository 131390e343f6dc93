"""The extraction service's hang-up watch (extract/service/server.py, HangupWatch) on a real
Unix socket pair whose client end is closed: ClientGone reaches the main thread's work, but
never its clean-up (a generator being closed after a failed write), where it ended as an
"Exception ignored" traceback in the journal."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from pcapvault.extract.service.server import HANGUP_POLL, ClientGone, HangupWatch


@pytest.fixture
def gone():
    """A service end whose client has hung up, and the SIGUSR1 handler restored after."""
    ours, theirs = socket.socketpair()
    theirs.close()
    before = signal.getsignal(signal.SIGUSR1)
    yield ours
    signal.signal(signal.SIGUSR1, before)
    ours.close()


def _work(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        time.sleep(0.01)


def test_work_for_nobody_is_stopped(gone):
    watch = HangupWatch(gone)
    try:
        with pytest.raises(ClientGone):
            _work(10 * HANGUP_POLL)
    finally:
        watch.close()


def test_clean_up_is_never_interrupted_and_the_work_after_it_is(gone):
    def pipeline():
        try:
            yield 1
        finally:
            _work(3 * HANGUP_POLL)  # closing files while the watch fires
            cleaned.append(True)

    cleaned: list[bool] = []
    watch = HangupWatch(gone)
    try:
        with pytest.raises(BrokenPipeError):  # a write failed: the pipeline is closed
            try:
                for _ in pipeline():
                    raise BrokenPipeError()
            finally:
                _work(3 * HANGUP_POLL)  # unwinding: not interrupted either
        assert cleaned == [True]
        with pytest.raises(ClientGone):  # work that goes on afterwards is stopped
            _work(10 * HANGUP_POLL)
    finally:
        watch.close()
