"""POST /invocations: the one inference route of a SageMaker-style container, as vLLM serves it.
The body says which API it speaks: `messages` -> a chat completion, `prompt` -> a text
completion; each is then exactly the request its own route would take (checks, streaming,
errors). With /ping (health.py) this is what such a platform calls."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from server.api.body import ThreadParsedRoute
from server.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from server.api.routes.chat import RESPONSES, chat_completions
from server.api.routes.completions import completions
from server.api.services import Services, get_services
from server.exceptions import InvalidRequest

router = APIRouter(route_class=ThreadParsedRoute, responses=RESPONSES)
# the key that tells the APIs apart, in the order they are looked for
KINDS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("messages", ChatCompletionRequest),
    ("prompt", CompletionRequest),
)


@router.post(
    "/invocations",
    response_model=ChatCompletionResponse | CompletionResponse,
    tags=["chat", "completions"],
)
async def invocations(
    request: Request,
    body: dict[str, Any] = Body(
        description="a /v1/chat/completions body (with `messages`) or a /v1/completions one "
        "(with `prompt`)"
    ),
    services: Services = Depends(get_services),
) -> ChatCompletionResponse | CompletionResponse | StreamingResponse:
    key, model = _kind(body)
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:  # the app's handler words it as the route itself would
        raise RequestValidationError(exc.errors()) from None
    if key == "messages":
        return await chat_completions(parsed, request, services)  # type: ignore[arg-type]
    return await completions(parsed, request, services)  # type: ignore[arg-type]


def _kind(body: dict[str, Any]) -> tuple[str, type[BaseModel]]:
    for key, model in KINDS:
        if key in body:
            return key, model
    raise InvalidRequest(
        "The request cannot be served at /invocations: send a chat completion (with `messages`) "
        "or a text completion (with `prompt`).",
        param="messages",
        code="missing_required_parameter",
    )
