"""A hostile client of the extraction service: speaks its framing directly, not through
npcapextract, as a local user with a raw socket would.

Run as a test user (`python -c SOURCE` so that the user need not read this file): a JSON plan
on stdin, one JSON line per exchange on stdout. The plan's keys:
  socket, payload (the request's JSON object; its password comes from "password"),
  repeat_seconds (send the same request on new connections for this long),
  raw (send this text, latin-1, instead of a request), wait_before_send, close_after_send
  (hang up without reading, after wait_after_send seconds), trickle_every (send the request
  one byte per this many seconds), garbage_for (send this many seconds of junk after it),
  hold_for (read nothing for this many seconds after sending, then read).
"""

import json
import socket
import struct
import sys
import time

FRAME = struct.Struct("!c3xQ")


def frames(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos + FRAME.size <= len(data):
        kind, n = FRAME.unpack_from(data, pos)
        out.append((kind.decode(), data[pos + FRAME.size : pos + FRAME.size + n]))
        pos += FRAME.size + n
    return out


def exchange(plan: dict) -> dict:
    body = json.dumps({"version": 1, "password": plan.get("password", "x"),
                       **plan["payload"]}).encode()
    message = FRAME.pack(b"Q", len(body)) + body
    if "raw" in plan:  # bytes that are not a request at all
        message = plan["raw"].encode("latin-1")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(plan["socket"])
    t0 = sent_at = time.monotonic()
    result: dict = {"send_error": None, "error": None}
    try:
        time.sleep(plan.get("wait_before_send", 0))
        if plan.get("trickle_every"):
            for i in range(len(message)):
                s.send(message[i : i + 1])
                time.sleep(plan["trickle_every"])
        else:
            s.sendall(message)
        sent_at = time.monotonic()
        if plan.get("garbage_for"):
            s.setblocking(False)
            until = time.monotonic() + plan["garbage_for"]
            while time.monotonic() < until:
                try:
                    s.send(b"x" * 4096)
                except BlockingIOError:
                    time.sleep(0.01)
            s.settimeout(60)
    except OSError as e:
        result["send_error"] = type(e).__name__
    if plan.get("close_after_send"):
        time.sleep(plan.get("wait_after_send", 0))
        s.close()
        return {**result, "closed": True}
    time.sleep(plan.get("hold_for", 0))
    data = b""
    try:
        while chunk := s.recv(1 << 20):
            data += chunk
    except OSError as e:
        result["error"] = type(e).__name__
    finally:
        s.close()
    got = frames(data)
    replies = [json.loads(p) for k, p in got if k in "R"]
    result.update(
        replies=replies,
        data_bytes=sum(len(p) for k, p in got if k == "D"),
        trailer=next((json.loads(p) for k, p in got if k == "T"), None),
        elapsed=time.monotonic() - t0,
        after_send=time.monotonic() - sent_at,
    )
    return result


def main() -> None:
    plan = json.load(sys.stdin)
    until = time.monotonic() + plan.get("repeat_seconds", 0)
    while True:
        print(json.dumps(exchange(plan)), flush=True)
        if time.monotonic() >= until:
            return


if __name__ == "__main__":
    main()
