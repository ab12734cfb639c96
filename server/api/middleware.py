"""ASGI middleware that must see every request, routed or not: request ids and the access log,
the body-size cap, JSON bodies whatever their Content-Type, paths as the routes have them, HEAD,
API keys, the shutdown drain and CORS. Each answers refusals itself (send_error), in the
envelope of the API asked: Anthropic's under /v1/messages, else OpenAI's."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
import uuid

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ANTHROPIC_OVERLOADED, SENT_PATH, error_body, speaks_anthropic
from server.api.paths import route_path
from server.api.sse import named_event, wire_json
from server.jobs.project import project_var
from server.log import INTERNAL, request_id_var
from server.metrics import CLIENT_CLOSED_REQUEST

logger = logging.getLogger(__name__)

# A client's X-Request-ID is echoed and logged if it is one word of visible ASCII (trace ids
# come as UUIDs, base64, paths: tenant/abc:1): no space, control or non-ASCII character that
# could split or forge a log line.
CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,256}")
# Open without an API key: they hold no secrets, and a browser cannot send a Bearer header to
# open them (the docs and their assets, the playground, liveness and version).
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/health",
        "/ping",
        "/version",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)
PUBLIC_PREFIXES = ("/static-offline-docs/", "/playground/")
# An error body longer than this is not parsed for the access log (error envelopes are small).
MAX_LOGGED_ERROR_BYTES = 4096
MAX_LOGGED_REASON_CHARS = 300

access_logger = logging.getLogger("server.access")


async def send_error(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    error_type: str,
    code: str | None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    anthropic = speaks_anthropic(scope)
    body = wire_json(error_body(anthropic, status, message, error_type, None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID or a new one), logs with it and
    echoes it in the response; writes one access line per request (status, latency), which for
    a 4xx/5xx also carries the error's code and message: the reason is in the log once, and
    never the client's data (only our own error text)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request_id_var.set(request_id)
        started = time.perf_counter()
        response = _ResponseRecord()

        # Anthropic's clients read the id from request-id (its SDK's `_request_id`).
        anthropic = speaks_anthropic(scope)
        names = [b"x-request-id", b"request-id"] if anthropic else [b"x-request-id"]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                if anthropic and message["status"] == 503:
                    message["status"] = ANTHROPIC_OVERLOADED  # its SDK's OverloadedError
                headers = message.setdefault("headers", [])
                headers += [(name, request_id.encode()) for name in names]
            response.record(message)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if not response.started:  # the caller went away (a cancelled batch's lines)
                response.status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            _log_access(scope, response, time.perf_counter() - started)


class _ResponseRecord:
    """The status and, for an error, the start of the body (its error envelope)."""

    def __init__(self) -> None:
        self.status = 500  # what the client sees if the app raised before answering
        self.started = False
        self.ended = False  # the body's last part sent (not: a stream the client cut short)
        self.error_body = b""

    def record(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
        elif message["type"] == "http.response.body":
            self.ended = not message.get("more_body", False)
            if self.status >= 400:
                room = MAX_LOGGED_ERROR_BYTES - len(self.error_body)
                self.error_body += message.get("body", b"")[: max(room, 0)]

    def reason(self) -> tuple[str | None, str | None]:
        try:
            error = json.loads(self.error_body)["error"]
            return error.get("code") or error.get("type"), str(error["message"])
        except (ValueError, KeyError, TypeError):
            return None, None


def _log_access(scope: Scope, response: _ResponseRecord, seconds: float) -> None:
    # (the peer's address, or the client's a trusted proxy forwarded: --forwarded-allow-ips)
    fields: dict[str, object] = {
        "method": scope["method"],
        "path": scope["path"],
        "status": response.status,
        "duration_ms": round(seconds * 1000, 1),
    }
    line = f"{scope['method']} {scope['path']} {response.status} {seconds * 1000:.1f} ms"
    if scope.get(INTERNAL):  # (a job's work, not a client's request: told apart)
        fields["internal"] = True
        line += " (internal: a job's)"
    else:
        fields["client"] = client = (scope.get("client") or ("-",))[0]
        line += f" from {client}"
    if response.started and not response.ended:  # (a stream whose client went away)
        fields["cut_short"] = True
        line += " (cut short: the client went away)"
    if response.status >= 400:
        code, message = response.reason()
        if message is not None:
            message = message[:MAX_LOGGED_REASON_CHARS]
            fields |= {"error_code": code, "error_message": message}
            line += f" {code}: {message}"
    # a 5xx is a warning (alerts may watch them); the rest, the client's business, info
    level = logging.WARNING if response.status >= 500 else logging.INFO
    access_logger.log(level, "%s", line, extra={"fields": fields})


UPLOAD_PATHS = frozenset({"/v1/files"})  # (multipart/form-data; every other body is JSON)
MAX_JSON_VALUES = 1_000_000
TOO_MANY_VALUES = (
    f"The request body holds more than {MAX_JSON_VALUES:,} JSON values "
    "(counted by its commas, brackets and braces): the server's limit."
)


class BodyLimitsMiddleware:
    """Refuses with a 413, before the app parses it, a request body over max_bytes or one that
    holds more than MAX_JSON_VALUES JSON values.

    With a Content-Length the header decides the size (the HTTP server never delivers more than
    it declares); a chunked body is read here up to the limit. The value count bounds what
    parsing costs, which the size alone does not: 290 MB of `{},` parse into ~7.7 GB of Python
    objects and hold the event loop for seconds. Values are counted by their commas, brackets
    and braces (C-speed `bytes.count`; ones inside strings count too, which only makes the
    bound stricter: a million is ~8x the longest context's worth of token ids). The body is
    read here, then replayed to the app (which reads all of it anyway)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, self._too_large())
            return
        writes = scope["method"] in ("POST", "PUT", "PATCH")
        is_json = writes and route_path(scope) not in UPLOAD_PATHS
        if declared is not None and not is_json:
            await self.app(scope, receive, send)
            return
        messages, size, values = [], 0, 0
        while True:
            message = await receive()
            messages.append(message)
            body = message.get("body", b"")
            size += len(body)
            if is_json:
                values += body.count(b",") + body.count(b"[") + body.count(b"{")
            if size > self.max_bytes or values > MAX_JSON_VALUES:
                too_large = size > self.max_bytes
                await self._refuse(scope, send, self._too_large() if too_large else TOO_MANY_VALUES)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"The request body is larger than the server's limit of {self.max_bytes} bytes."

    async def _refuse(self, scope: Scope, send: Send, message: str) -> None:
        await send_error(scope, send, 413, message, "invalid_request_error", "request_too_large")


class JsonBodyMiddleware:
    """Every request body here is JSON: one sent by a client that is not a browser with another
    Content-Type (curl's `-d` says application/x-www-form-urlencoded) is read as JSON anyway, as
    most OpenAI-compatible servers effectively do; if it is not JSON, that is the error.

    Not for browsers (they send an Origin): a cross-site form or no-cors fetch may post
    text/plain without asking first, and reading that as JSON would let any web page drive a
    server that has no API key. A browser's request must say application/json, which a
    cross-site page can only send after a CORS preflight (--allowed-origins).

    The one other body is a file upload (multipart/form-data, at UPLOAD_PATHS), left as it is.
    A cross-site form can post that with no preflight too, so a browser's request there is
    taken only from an origin --allowed-origins lists; from any other, whatever its content
    type says, it is not read as an upload (a 400)."""

    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            origin = dict(scope["headers"]).get(b"origin")
            if route_path(scope) in UPLOAD_PATHS:
                if origin is not None and not self._allowed(origin):
                    _set_content_type(scope, b"text/plain")
            elif origin is None:
                _set_content_type(scope, b"application/json")
        await self.app(scope, receive, send)

    def _allowed(self, origin: bytes) -> bool:
        return "*" in self.allowed_origins or origin.decode("latin-1") in self.allowed_origins


def _set_content_type(scope: Scope, value: bytes) -> None:
    # In place: the outer middleware read what the router writes into this scope.
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    scope["headers"] = [*headers, (b"content-type", value)]


# OpenAI's resources a client whose base URL is the server itself (not .../v1) asks for at the
# root: `/models`, `/completions`, `/chat/completions`... (the hosted APIs these clients were
# written for answer both). Anthropic's SDK adds /v1 itself; vLLM's own root routes stay.
OPENAI_RESOURCES = frozenset(
    {"models", "chat", "completions", "responses", "conversations", "files", "batches"}
    | {"embeddings", "audio", "images", "moderations", "fine_tuning"}  # (not served: a 404)
)


# Hosted APIs' own prefixes for OpenAI's routes: Azure OpenAI's deployments (its SDK calls
# /openai/deployments/{deployment}/chat/completions?api-version=..., the deployment also the
# body's model) and its v1 path, which Groq's SDK writes under any base URL (/openai/v1/...).
AZURE_DEPLOYMENT = re.compile(r"^/openai/deployments/[^/]+(?=/)")
OPENAI_V1_PREFIX = "/openai/v1/"


def hosted_prefix(path: str) -> int:
    """The length of a hosted API's prefix before an OpenAI resource (0: none)."""
    if path.startswith(OPENAI_V1_PREFIX):
        return len(OPENAI_V1_PREFIX) - 1
    match = AZURE_DEPLOYMENT.match(path)
    return match.end() if match else 0


class PathMiddleware:
    """The path a client sends, as the routes have it: `/v1/chat/completions/` is
    `/v1/chat/completions` (a client whose base URL ends in a slash is served, not redirected:
    Starlette's 307 would make it send its POST body again, to an http:// Location even behind
    a TLS proxy, and many clients do not follow it); an OpenAI resource at the root is its
    /v1 one (`GET /models` is `GET /v1/models`), and so is one under a hosted API's prefix
    (`/openai/deployments/{deployment}/chat/completions`, `/openai/v1/models`). Behind a
    proxy serving it under --root-path (`/vlm`), whether the proxy strips the prefix or
    passes it on, the path is the prefix and the route's path, and root_path the prefix, as
    ASGI has them (route_path reads the route's back); the URLs the server writes (/docs, a
    job's status_url, the playground's) name it."""

    def __init__(self, app: ASGIApp, root_path: str = ""):
        self.app = app
        self.root = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        sent = scope.get("path", "")
        raw = scope.get("raw_path") or sent.encode()  # (as sent: percent-escapes kept)
        scope = {**scope, "root_path": self.root}
        path = route_path(scope)
        root, raw_root = self.root, self.root.encode()
        if path != sent:  # (the prefix passed on; sent escaped, `/%76lm/...`, it is not raw's)
            raw = raw[len(raw_root) :] if raw.startswith(raw_root) else _raw_tail(raw, path)
            raw = raw or b"/"
        # (a request target need not start with "/": `GET *x` reaches here too)
        if scope["type"] == "http" and len(path) > 1 and path.startswith("/"):
            if path.endswith("/"):
                path, raw = path.rstrip("/") or "/", raw.rstrip(b"/") or b"/"
            prefix = hosted_prefix(path)
            if prefix and path[prefix:].split("/", 2)[1] in OPENAI_RESOURCES:
                path, raw = path[prefix:], _raw_tail(raw, path[prefix:])
            if path.split("/", 2)[1] in OPENAI_RESOURCES:
                path, raw = f"/v1{path}", b"/v1" + raw
        if root or path != sent:
            scope = {**scope, "path": root + path, "raw_path": raw_root + raw, SENT_PATH: sent}
        await self.app(scope, receive, send)


def _raw_tail(raw: bytes, tail: str) -> bytes:
    """The raw path's end that is `tail` (its escapes kept), or `tail` itself."""
    encoded = tail.encode()
    return raw[len(raw) - len(encoded) :] if raw.endswith(encoded) else encoded


class HeadMiddleware:
    """HEAD is GET without the body (RFC 9110), on every GET route: uptime checkers and
    `curl -I` probe /health so. (Starlette's own routes add HEAD to GET; FastAPI's do not.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def headers_only(message: Message) -> None:
            nonlocal ended
            if ended:
                return  # (the GET's body)
            await send(message)
            if message["type"] == "http.response.start":
                # Ended at once (the GET's Content-Length stays, as HEAD answers it): a
                # streamed GET then sees its client gone and stops, rather than running on.
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                ended = True

        # A copy: uvicorn frames the answer by the scope it made (a HEAD's has no body; told
        # GET, it wanted the Content-Length's bytes). Metrics label it by matching its path.
        await self.app({**scope, "method": "GET"}, receive, headers_only)


def internal(app: ASGIApp) -> ASGIApp:
    """`app` for the server's own requests (INTERNAL)."""

    async def marked(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, INTERNAL: True}, receive, send)

    return marked


# Headers a key may come in besides Authorization: Bearer: Anthropic's, Azure OpenAI's
KEY_HEADERS = (b"x-api-key", b"api-key")


class ApiKeyMiddleware:
    """When keys are configured, every route but the open ones needs 'Authorization: Bearer <key>'
    (or 'x-api-key: <key>', 'api-key: <key>'), and the request is in that key's project (what
    stored objects it sees: server/jobs/project.py).
    Keys are compared in constant time, against all keys, so timing reveals nothing."""

    def __init__(self, app: ASGIApp, keys: dict[str, str], open_paths: frozenset[str]):
        """keys: each key's project."""
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.projects = tuple(keys.values())
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or self._is_open(route_path(scope)):
            await self.app(scope, receive, send)
            return
        if scope.get(INTERNAL):  # a job's own request: in the job's project (its task's)
            await self.app(scope, receive, send)
            return
        raw = scope.get("headers", [])
        names = [name for name, _ in raw if name in (b"authorization", *KEY_HEADERS)]
        if len(names) != len(set(names)):  # two keys in one header name: which one is meant
            # (a proxy that checks the first and a server that reads the last disagree) is
            # not guessed
            await _unauthorized(scope, send, "More than one API key in one header.")
            return
        headers = dict(raw)
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # Bearer (OpenAI's clients), x-api-key (Anthropic's) or api-key (Azure OpenAI's)
        tokens = [token.strip()] if scheme.lower() == b"bearer" else []
        tokens += [headers[name].strip() for name in KEY_HEADERS if name in headers]
        keys = {token for token in tokens if token}  # (an empty one is no key)
        if len(keys) > 1:  # two different keys (Bearer and x-api-key): which one is meant?
            await _unauthorized(scope, send, "Two different API keys in one request.")
            return
        if keys and (index := self._index_of(keys.pop())) is not None:
            reset = project_var.set(self.projects[index])
            try:
                await self.app(scope, receive, send)
            finally:
                project_var.reset(reset)
            return
        await _unauthorized(scope, send, "Invalid or missing API key.")

    def _index_of(self, token: bytes) -> int | None:
        """Which key it is; None if it is none."""
        matches = [hmac.compare_digest(token, key) for key in self.keys]  # all compared
        return matches.index(True) if True in matches else None

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def _unauthorized(scope: Scope, send: Send, reason: str) -> None:
    await send_error(
        scope,
        send,
        401,
        f"{reason} Send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
        "authentication_error",
        "invalid_api_key",
        [(b"www-authenticate", b"Bearer")],
    )


class LocalHostMiddleware:
    """A server with no API key on a loopback address answers only requests addressed to this
    machine: Host localhost (or *.localhost), this machine's name, an IP address, or a name of
    --allowed-hosts. A web page can rebind its own name to 127.0.0.1 (DNS rebinding) and then
    call such a server as its own origin, past CORS, and read every answer (a security trial
    listed files and ran chats so); its requests still carry its name. Ollama refuses them
    likewise. With keys the page cannot authenticate, and this guard is not installed."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] = ()):
        self.app = app
        self.allowed = frozenset(
            name.lower() for name in ("localhost", socket.gethostname(), *allowed)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get(INTERNAL):  # (a batch line, a job: ours)
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if self._local(host):
            await self.app(scope, receive, send)
            return
        await send_error(
            scope,
            send,
            403,
            f"This server has no API key and listens on a loopback address, so it answers only "
            f"requests addressed to localhost, this machine's name or an IP address, not "
            f"{host[:100]!r} (a web page could otherwise reach it by rebinding its name). Call "
            "it as http://localhost:<port>, or start it with --allowed-hosts naming that host, "
            "or with --api-key.",
            "invalid_request_error",
            "host_not_allowed",
        )

    def _local(self, host: str) -> bool:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host  # (name:port)
        name = name.strip().lower().rstrip(".")
        if not name or name.startswith("["):  # (none sent; [v6]:port is an IP address)
            return True
        try:
            ipaddress.ip_address(name)
            return True  # (a rebinding page's requests carry its name, never an address)
        except ValueError:
            pass
        return name in self.allowed or name.endswith(".localhost")


SHUTTING_DOWN = "The server is shutting down; retry on another instance or later."


class DrainMiddleware:
    """While the server shuts down (app.state.draining), new requests get a 503 at once; the
    others are counted (app.state.num_in_flight), so the drain knows when they have finished.
    One still running when --shutdown-timeout is up (the server cancels it) gets a 503 too,
    or, mid-stream, an error event in its API's form (so no client reads a cut stream as a
    whole answer), then the end of its body: never a bare 500 and a traceback."""

    # Still answered while draining: Prometheus keeps scraping a replica that drains, so its
    # last requests' counts and latencies are seen (vLLM serves /metrics until it exits).
    OPEN_WHILE_DRAINING = frozenset({"/metrics"})

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and getattr(scope["app"].state, "draining", False):
            if route_path(scope) in self.OPEN_WHILE_DRAINING:
                await self.app(scope, receive, send)
            else:
                await _shutting_down(scope, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        state.num_in_flight = getattr(state, "num_in_flight", 0) + 1
        started, streams, last = False, False, b""

        async def tracked(message: Message) -> None:
            nonlocal started, streams, last
            if message["type"] == "http.response.start":
                started = True
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                streams = content_type.startswith(b"text/event-stream")
            elif streams:
                last = message.get("body", b"") or last  # (a Responses event's number)
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            # Only the server's own cut-off at --shutdown-timeout or a second Ctrl-C
            # (app.state.cut_off, which says why, set as the drain's wait ends), never a
            # client's hang-up or a job's cancel (the server's requests to itself: their job
            # handles it).
            if not getattr(state, "cut_off", False) or scope.get(INTERNAL):
                raise
            logger.warning("request cut off: %s", state.cut_off)
            with contextlib.suppress(Exception):  # (the client may be gone too)
                if started:
                    body = cut_off_event(scope, last) if streams else b""
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                else:
                    await _shutting_down(scope, send)
        finally:
            state.num_in_flight -= 1


SEQUENCE_NUMBER = re.compile(rb'"sequence_number": ?(\d+)')


def cut_off_event(scope: Scope, last: bytes) -> bytes:
    """The error event that ends a stream cut off at shutdown, in its API's form: Anthropic's
    `error` event, the Responses API's (numbered after the last one sent), or the chat and
    completions streams' error chunk."""
    message = SHUTTING_DOWN
    if speaks_anthropic(scope):
        data: dict = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
        return named_event("error", data).encode()
    if route_path(scope).startswith("/v1/responses"):
        numbers = SEQUENCE_NUMBER.findall(last)
        data = {
            "type": "error",
            "sequence_number": int(numbers[-1]) + 1 if numbers else 0,
            "code": "server_shutting_down",
            "message": message,
            "param": None,
        }
        return named_event("error", data).encode()
    data = error_body(False, 503, message, "server_error", None, "shutting_down")
    return f"data: {wire_json(data)}\n\ndata: [DONE]\n\n".encode()  # (as after any error)


async def _shutting_down(scope: Scope, send: Send) -> None:
    await send_error(
        scope,
        send,
        503,
        SHUTTING_DOWN,
        "server_error",
        "shutting_down",
        [(b"retry-after", b"5")],
    )


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS, a refused preflight (an origin, method or header not allowed) in
    the API's error envelope rather than Starlette's plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        body = error_body(
            False,
            response.status_code,
            f"{reason} (see --allowed-origins).",
            "invalid_request_error",
        )
        headers = {  # the CORS headers; JSONResponse sets its own type and length
            k: v
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "content-type")
        }
        return JSONResponse(body, status_code=response.status_code, headers=headers)
