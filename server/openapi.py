"""The OpenAPI 3.1 description of npcapserve's API, served at /api/v1/openapi.json.

Written out here rather than generated from the routes: the routes read their parameters
by hand (so each bad one gets its own message), and the description is the contract
docs/API.md explains; a test checks that every route is described."""

from __future__ import annotations

TIME = ("A time as npcapextract takes it: 'YYYY-MM-DD hh:mm:ss[.fraction]' (the sensor's "
        "local time), ISO 8601 with Z or an offset, epoch seconds (1763737200.25), or "
        "relative: now, -15m, -2h, -30s, -1d.")


def _param(name: str, text: str, required: bool = False, schema: dict | None = None) -> dict:
    return {"name": name, "in": "query", "required": required, "description": text,
            "schema": schema or {"type": "string"}}


WINDOW = [
    _param("begin", "Start of the window (inclusive). " + TIME, True),
    _param("end", "End of the window (exclusive). " + TIME, True),
    _param("filter", "tcpdump filter expression (libpcap). A member of a --group-filter "
                     "group gets it inside their group's filter."),
    _param("dumpset", "Some of the served dump sets, by the paths /api/v1/status gives, comma "
                      "separated (default: all of them)."),
]


def _errors(*codes: int) -> dict:
    text = {400: "Bad parameter: filter, time, format, limit or step.",
            401: "No or wrong credentials (WWW-Authenticate: Basic realm=\"pcapvault\").",
            403: "Not a member of the extractors' group.",
            414: "Query string longer than 8192 bytes.",
            429: "Too many failed logins from this address (Retry-After).",
            503: "Too many connections at once, or a worker computing tables ended: ask again."}
    return {str(c): {"description": text[c],
                     "content": {"application/json": {"schema": {"$ref": "#/components/"
                                                                  "schemas/Error"}}}}
            for c in codes}


DATA_ERRORS = (400, 401, 403, 414, 429, 503)


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document() -> dict:
    """The OpenAPI document."""
    obj = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pcapvault npcapserve", "version": "1",
                 "description": "Packets, conversations, traffic volume, status and metrics "
                                "of a pcapvault sensor. See docs/API.md."},
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic",
                          "description": "The user's password, checked by PAM (service "
                                         "npcapextract)."},
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An API token from `npcapserve token create`."},
            },
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}},
        },
        "security": [{"basic": []}, {"bearer": []}],
        "paths": {
            "/api/v1/pcap": {"get": {
                "summary": "The packets of a window and filter, as npcapextract writes them.",
                "parameters": [*WINDOW,
                               _param("format", "pcap (default) or pcapng.",
                                      schema={"enum": ["pcap", "pcapng"]}),
                               _param("snaplen", "Slice packets to this many bytes.",
                                      schema={"type": "integer", "minimum": 1,
                                              "maximum": 262144})],
                "responses": {
                    "200": {"description": "The capture, streamed (header only when nothing "
                                           "matches); Content-Disposition names a file.",
                            "content": {"application/vnd.tcpdump.pcap": {},
                                        "application/x-pcapng": {}}},
                    **_errors(*DATA_ERRORS)}}},
            "/api/v1/conversations": {"get": {
                "summary": "Conversations, endpoints or service ports of a window, from the "
                           "indexes.",
                "parameters": [*WINDOW,
                               _param("by", "conversation (default), endpoint or port.",
                                      schema={"enum": ["conversation", "endpoint", "port"]}),
                               _param("sort", "bytes (default) or packets.",
                                      schema={"enum": ["bytes", "packets"]}),
                               _param("limit", "Rows (default 100, at most --max-rows).",
                                      schema={"type": "integer", "minimum": 1})],
                "responses": {"200": _json("The table: rows, total_rows, packets, bytes, "
                                           "read_packets, warnings.", obj),
                              **_errors(*DATA_ERRORS)}}},
            "/api/v1/volume": {"get": {
                "summary": "Packets and bytes per step of a window, from the indexes.",
                "parameters": [*WINDOW,
                               _param("step", "Step: seconds, or a number with ms, s, m, h or "
                                              "d (default 60). At most --max-steps steps.")],
                "responses": {"200": _json("begin_ns, step_ns, packets[], bytes[], warnings.",
                                           obj),
                              **_errors(*DATA_ERRORS)}}},
            "/api/v1/catalogue": {"get": {
                "summary": "The files of one dump set indexed since a cursor, each with its "
                           "conversation summaries, and the names of all its files: what "
                           "npcapfleet sync pulls (docs/FLEET.md). Refused (403) to users "
                           "restricted by a group filter.",
                "parameters": [
                    _param("dumpset", "The dump set, by the path /api/v1/status gives "
                                      "(required when several are served)."),
                    _param("since", "The previous answer's cursor (none: from the oldest "
                                    "file)."),
                    _param("limit", "Files in one answer (default 100, at most 1000).",
                           schema={"type": "integer", "minimum": 1, "maximum": 1000})],
                "responses": {"200": _json("{time, dumpset, interface, linktype, snaplen, "
                                           "nanosecond, files: [{name, first_ns, last_ns, "
                                           "index_mtime_ns, packets, conversations: "
                                           "{address_a: [...], port_a, address_b, port_b, "
                                           "protocol, packets_a_to_b, bytes_a_to_b, "
                                           "packets_b_to_a, bytes_b_to_a, first_ns, last_ns, "
                                           "view} (columns), warnings}], names, cursor, "
                                           "more}", obj),
                              **_errors(*DATA_ERRORS)}}},
            "/api/v1/status": {"get": {
                "summary": "Per dump set: interface, first and last packet, files, bytes on "
                           "disk, budget, drops, index backlog.",
                "security": [{}],
                "responses": {"200": _json("{time, dumpsets: [...]}", obj),
                              **_errors(401, 403, 429)}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (text format); no login unless "
                           "--metrics-auth.",
                "security": [{}],
                "responses": {"200": {"description": "Prometheus text exposition format.",
                                      "content": {"text/plain": {}}},
                              **_errors(401, 403, 429)}}},
            "/api/v1/filter": {"get": {
                "summary": "Whether a filter compiles (libpcap, with the same bound as the "
                           "other requests): the web page checks what is typed with it.",
                "parameters": [_param("expr", "tcpdump filter expression.")],
                "responses": {"200": _json("{filter, valid: true}", obj),
                              **_errors(400, 401, 403, 429)}}},
            "/login": {"post": {
                "summary": "The web page's login: a form (user, password) checked like HTTP "
                           "Basic; sets the session cookie (HttpOnly, SameSite=Strict, Secure "
                           "under TLS). Same-origin requests only.",
                "security": [{}],
                "responses": {"200": _json("{user, method, restricted_to, groups}", obj),
                              **_errors(400, 401, 403, 429)}}},
            "/logout": {"post": {
                "summary": "Ends the session on the server and clears its cookie. "
                           "Same-origin requests only.",
                "security": [{}],
                "responses": {"200": _json("{logged_out: true}", obj), **_errors(403)}}},
            "/session": {"get": {
                "summary": "Who the credentials (session cookie, Basic or token) stand for.",
                "responses": {"200": _json("{user, method, restricted_to, groups}", obj),
                              **_errors(401, 403, 429)}}},
            "/api/v1/openapi.json": {"get": {
                "summary": "This description.", "security": [{}],
                "responses": {"200": _json("OpenAPI 3.1", obj)}}},
        },
    }
