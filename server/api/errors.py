"""Every non-2xx answer is {"error": {"message", "type", "param", "code"}}, OpenAI's envelope;
under /v1/messages (Anthropic's Messages API) it is Anthropic's:
{"type": "error", "error": {"type", "message"}, "request_id"}.

Validation errors name the offending field; unexpected exceptions are logged with the request
id and answered with a generic 500 that carries no exception text.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from server.api.paths import route_path
from server.api.protocol import ErrorInfo, ErrorResponse
from server.exceptions import ClientDisconnected, ServerError
from server.log import request_id_var

logger = logging.getLogger(__name__)

TYPE_BRANCHES = frozenset({"str", "int", "float", "bool", "dict", "function-after"})
# A content part's (or a Responses input item's) type tags, which pydantic puts in the loc
# before its fields.
PART_TAGS = frozenset(
    {"text", "input_text", "output_text", "refusal", "image_url", "input_image", "video_url"}
    | {"file", "input_file"}
    | {"message", "function_call", "function_call_output", "reasoning", "item_reference"}
    | {"function_tool", "namespace_tool", "hosted_tool"}
    # the Messages API's blocks and tools
    | {"image", "tool_use", "tool_result", "thinking", "other", "custom", "server"}
)
SOURCE_TAGS = frozenset({"base64", "url", "file"})

# What a stream that already sent its status line says of an unexpected failure (the details
# are in the log, under the request id).
SERVER_ERROR = "The server had an error while processing your request."

# (A 404, an unknown route, is OpenAI's invalid_request_error, as its other 404s here.)
HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}

# Anthropic's error types by status (its SDK raises its exception classes by status).
ANTHROPIC_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
# The status Anthropic's API answers overloaded with (sent in place of our 503).
ANTHROPIC_OVERLOADED = 529


# Routes both APIs serve: their errors are Anthropic's when Anthropic's SDK calls them.
SHARED_PATHS = ("/v1/models", "/v1/files")


def speaks_anthropic(scope: Scope, unknown_route: bool = False) -> bool:
    """Whether the request's errors go in Anthropic's envelope: its Messages API's routes, and
    the routes both APIs share (models, files), or a route this server does not have, when
    Anthropic's SDK calls them (it sends anthropic-version). OpenAI's own routes keep their
    envelope whatever headers a gateway forwards."""
    path = route_path(scope)
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return True
    shared = any(path == p or path.startswith(f"{p}/") for p in SHARED_PATHS)
    return (shared or unknown_route) and any(
        name == b"anthropic-version" for name, _ in scope.get("headers", [])
    )


# Anthropic's error_code (sent in the error's details) for a request its message-threads beta
# cannot serve: the SDK then sends the whole conversation without `thread` (its tool runner
# threads by default).
THREAD_UNSUPPORTED = "thread_unsupported_request"


def anthropic_error_type(status: int) -> str:
    return ANTHROPIC_ERROR_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )


def anthropic_message(message: str, param: str | None) -> str:
    """Anthropic's envelope has no param: the message names the field."""
    return f"{param}: {message}" if param and param not in message else message


def error_body(
    anthropic: bool,
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """An error's body in the envelope its client reads (anthropic: speaks_anthropic)."""
    if not anthropic:
        info = ErrorInfo(message=message, type=error_type, param=param, code=code)
        return ErrorResponse(error=info).model_dump()
    error: dict[str, Any] = {
        "type": anthropic_error_type(status),
        "message": anthropic_message(message, param),
    }
    if code == THREAD_UNSUPPORTED:
        error["details"] = {"error_code": code}
    return {"type": "error", "error": error, "request_id": request_id_var.get()}


def error_response(
    request: Request,
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(speaks_anthropic(request.scope), status, message, error_type, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


# Where FastAPI found a field: the first item of its loc.
REQUEST_PARTS = frozenset({"body", "query", "path", "header", "cookie"})


def loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'list[...]', 1) -> 'messages[0].content[1]';
    ('query', 'limit') -> 'limit' (a field is named as the client sent it, wherever it was)."""
    param = ""
    previous: Any = None
    for item in loc[1:] if loc and loc[0] in REQUEST_PARTS else loc:
        if isinstance(item, int):
            param += f"[{item}]"
        elif isinstance(item, str) and _is_union_branch(item):
            continue  # a union branch pydantic tried, not a field
        elif isinstance(previous, int) and item in PART_TAGS:
            pass  # a content part's type tag, which pydantic puts before the part's fields
        elif previous == "source" and item in SOURCE_TAGS:
            pass  # an Anthropic image source's type tag (source.media_type, not .base64.)
        else:
            param += f".{item}" if param else str(item)
        previous = item
    return param or None


def _is_union_branch(item: str) -> bool:
    """A branch of a union in pydantic's loc: a type ("str", "list[...]", "literal[...]"),
    a validator ("function-after[...]") or a model's class name ("NamedToolChoice"). Field
    names are snake_case, so a capital first letter is a class name."""
    return "[" in item or item in TYPE_BRANCHES or item[:1].isupper()


# OpenAI's kinds of part and tool this server knows but cannot serve: said so, not "invalid"
AUDIO_PART_TAGS = frozenset({"input_audio", "audio"})
HOSTED_TOOLS = frozenset(
    {"web_search", "web_search_preview", "file_search", "code_interpreter", "image_generation"}
    | {"mcp", "computer_use_preview", "local_shell", "shell"}
)


def _unsupported_kind(error: Any, param: str | None) -> str | None:
    """What to say of an OpenAI audio part or custom tool (None: something else)."""
    kind = error.get("type")
    if kind == "union_tag_invalid" and error.get("ctx", {}).get("tag") in AUDIO_PART_TAGS:
        return (
            "The model served here reads text, images and video: audio input "
            f"(`{error['ctx']['tag']}` parts) is not supported."
        )
    tool_type = (param or "").startswith("tools[") and (param or "").endswith("].type")
    if tool_type and kind == "literal_error" and error.get("input") == "custom":
        return (
            "The custom tool is not available on this server: custom tools (free-form text "
            "input) are not supported; function tools only."
        )
    hosted = isinstance(given := error.get("input"), str) and given in HOSTED_TOOLS
    if tool_type and kind == "literal_error" and hosted:  # (the input may be any JSON)
        return (
            f"The {error['input']} tool is a hosted tool this server does not run: it is not "
            "supported; function tools only."
        )
    return None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    # Where a union failed (content: str | list[part]) pydantic reports every branch; the
    # deepest error is the one that names the actual mistake.
    first = max(
        errors, key=lambda e: len(e.get("loc", ())), default={"loc": (), "msg": "", "type": ""}
    )
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None, "invalid_json"
    param = loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if (refused := _unsupported_kind(first, param)) is not None:
        return refused, param, "unsupported_parameter"
    if first.get("type") == "union_tag_invalid":
        ctx = first.get("ctx", {})
        message = (
            f"Invalid type {ctx.get('tag')} at {param}; expected one of {ctx.get('expected_tags')}."
        )
        return message, param, "invalid_value"
    if first.get("type") == "union_tag_not_found":  # a part (or item) without its "type"
        key = str(first.get("ctx", {}).get("discriminator", "type")).strip("'")
        message = f"{param or 'The body'} has no `{key}`: each part or item names its {key}."
        return message, param, "invalid_value"
    if first.get("type") == "missing" and param is None:
        return "The request body is missing.", None, "invalid_value"
    if first.get("type") == "missing":  # (OpenAI's words and code)
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    where = f" at {param}" if param else ""
    # pydantic prefixes a validator's own words with "Value error, ".
    text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid request{where}: {_any_of(errors, param) or text}.", param, "invalid_value"


def _any_of(errors: list[Any], param: str | None) -> str | None:
    """A value of a type no branch of its union takes (content as an object: "a valid string"
    alone hid that a list of parts is read too): every branch's wish, joined."""
    wishes = [
        _wish(str(e.get("type", "")), str(e.get("msg", "")))
        for e in errors
        if loc_to_param(tuple(e.get("loc", ()))) == param
    ]
    wanted = list(dict.fromkeys(w for w in wishes if w))
    return "Input should be " + " or ".join(wanted) if len(wanted) > 1 else None


def _wish(error_type: str, message: str) -> str | None:
    """What one branch wanted ("a valid string", "'none', 'auto' or 'required'", "an object":
    never a class's name); None for an error past the branch's type."""
    if error_type in ("model_type", "dict_type", "model_attributes_type"):
        return "an object"
    if error_type.endswith("_type") or error_type == "literal_error":
        return message.removeprefix("Input should be ")
    return None


# FastAPI's words for a body json.loads could not read for another reason than its syntax: not
# UTF-8, nested past Python's stack, an integer past Python's digit limit.
BODY_PARSE_ERROR = "There was an error parsing the body"


def _unreadable_body(request: Request) -> str:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return (
            f"The request body cannot be read: it is sent with Content-Encoding {encoding}, "
            "and this server reads uncompressed JSON only."
        )
    return (
        "The request body is not valid JSON: it must be UTF-8 text, not nested too deeply, "
        "with integers of at most 4300 digits."
    )


def _not_sent_as_json(request: Request, exc: RequestValidationError) -> bool:
    """A JSON route's body that was not read as JSON: a browser's request (the others' are
    read as JSON whatever they say, see JsonBodyMiddleware) with another Content-Type."""
    body_errors = [e for e in exc.errors() if tuple(e.get("loc", ())) == ("body",)]
    content_type = request.headers.get("content-type", "")
    return bool(body_errors) and "json" not in content_type and request.method != "GET"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        # A 503 (back-pressure: a full queue, a store away) is in the log once, as its access
        # line (a warning, with the code and message); another 5xx is an error of its own.
        if exc.status_code >= 500 and exc.status_code != 503:
            logger.error("%s: %s", type(exc).__name__, exc.message)
        retry_after = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return error_response(
            request, exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _not_sent_as_json(request, exc):
            message = (
                "The request body must be JSON sent with Content-Type: application/json (a "
                "browser's request is read as JSON only then)."
            )
            return error_response(
                request, 415, message, "invalid_request_error", None, "unsupported_media_type"
            )
        message, param, code = _validation_message(exc)
        return error_response(request, 400, message, "invalid_request_error", param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if status == 404 and message == "Not Found":
            sent = request.scope.get(SENT_PATH, request.url.path)
            message = _unknown_route(request.method, route_path(request.scope), sent)
            anthropic = speaks_anthropic(request.scope, unknown_route=True)
            body = error_body(anthropic, 404, message, "invalid_request_error")
            return JSONResponse(body, status_code=404)
        if status == 400 and message == BODY_PARSE_ERROR:  # read, but not as JSON text
            if isinstance(exc.__cause__, ClientDisconnect):  # (gone while it sent the body)
                gone = ClientDisconnected()
                return error_response(request, gone.status_code, gone.message, gone.error_type)
            return error_response(
                request,
                400,
                _unreadable_body(request),
                "invalid_request_error",
                None,
                "invalid_json",
            )
        code = None
        if status == 405 and message == "Method Not Allowed":  # (Starlette's: name what it takes)
            sent = request.scope.get(SENT_PATH, request.url.path)
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"Invalid method for URL ({request.method} {sent}); it takes {allowed}."
            code = "method_not_allowed"
        error_type = HTTP_ERROR_TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        return error_response(
            request, status, message, error_type, None, code, dict(exc.headers or {})
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            request, 500, "Internal server error; see the server log.", "server_error"
        )


SENT_PATH = "vlm.sent_path"  # (scope key: the path as the client sent it, before PathMiddleware)
# OpenAI endpoints a client may try that a Qwen-VL chat server has no model for.
NOT_SERVED = frozenset({"embeddings", "audio", "images", "moderations", "fine_tuning"})


def _unknown_route(method: str, path: str, sent: str) -> str:
    """path: as routed; sent: as the client sent it (a root /embeddings is /v1/embeddings)."""
    parts = path.split("/")
    if len(parts) > 2 and parts[1] == "v1" and parts[2] in NOT_SERVED:
        return (
            f"Unknown route: {method} {sent}. This server answers with the Qwen vision-language "
            "model it serves (chat completions, completions, Responses, Messages); it has no "
            f"{parts[2]} endpoint."
        )
    return f"Unknown route: {method} {sent}"
