"""The PAM-gated extraction service and its client (docs/SECURITY.md).

`server` is npcapextractd, started by systemd once per connection; `client` is npcapextract's
side of it; `wire` the framing both speak; `framed` the engine's output onto the connection;
`shared` the read buffers shared with the client. The engine knows nothing of this package:
the shared buffers reach it only as the `shared` argument of its reader.
"""

SOCKET = "/run/pcapvault/npcapextract.sock"  # npcapextract.socket's ListenStream
