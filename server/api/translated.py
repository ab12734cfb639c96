"""Another API's body served as a chat completion (OpenAI's Responses API, Anthropic's Messages
API): its body becomes a chat completion's, checked as the chat route checks it, and the
chat's errors are renamed as that body names its fields."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fastapi import Request
from pydantic import ValidationError

from server.api.errors import loc_to_param
from server.api.message_params import TRANSLATED
from server.api.protocol import ChatCompletionRequest
from server.api.routes.chat import to_chat_request, until_disconnected
from server.api.services import Services
from server.api.sse import EventWriter, event_stream
from server.engine.sequence import SequenceOutput
from server.exceptions import InvalidRequest, PromptTooLong, ServerError, refuse_unsupported
from server.pipelines.chat import ChatRequest, ChatResult, ChatRun

T = TypeVar("T")
Attempt = Callable[[ChatRequest], Awaitable[T]]


class Translated(Protocol):
    stream: bool | None

    def unsupported_fields(self) -> list[str]: ...

    def to_chat_body(self) -> dict: ...

    def name_error(self, exc: ServerError) -> None: ...

    def truncatable(self) -> int: ...

    def truncate(self, spans: int) -> None: ...

    def truncated(self) -> int: ...


@dataclass
class Started:
    """A streamed answer under way: its first output is in (so a queue timeout was a 503)."""

    chat: ChatRequest
    run: ChatRun
    first: SequenceOutput
    rest: AsyncIterator[SequenceOutput]

    def events(self, writer: EventWriter, body: Translated) -> AsyncIterator[str]:
        """The writer's events for the run; an error mid-stream named as the body names
        its fields (a constraint that fails: the field it came from)."""

        def named(exc: ServerError) -> None:
            self.chat.name_error(exc)
            body.name_error(exc)

        return event_stream(writer, self.run, self.first, self.rest, named)


def chat_body_error(exc: ValidationError) -> InvalidRequest:
    """A chat-level check the body failed once read as a chat completion (its own checks
    passed), naming the chat body's field (name_error renames it as the body has it)."""
    first = exc.errors()[0]
    text = str(first["msg"]).removeprefix("Value error, ")
    return InvalidRequest(
        f"The request cannot be read as a conversation: {text}.",
        param=loc_to_param(tuple(first.get("loc", ()))) or "messages",
        code="invalid_value",
    )


def translated_request(body: Translated, services: Services) -> ChatRequest:
    """The chat completion the body describes, checked as the chat route checks it."""
    refuse_unsupported(body.unsupported_fields())
    try:
        chat_body = ChatCompletionRequest.model_validate(
            body.to_chat_body(), context={TRANSLATED: True}
        )
    except ValidationError as exc:
        raise chat_body_error(exc) from None
    return to_chat_request(chat_body, services, services.sampling_defaults, "native")


def shorten(body: Translated) -> bool:
    """One more of the body's oldest spans left out of its prompt (the Responses API's
    truncation "auto"); False when truncation is off or nothing more may go."""
    if body.truncated() >= body.truncatable():
        return False
    body.truncate(body.truncated() + 1)
    return True


# What a shorter prompt (the Responses API's truncation) may cure: its length, and the media
# only the oldest turns hold (a screenshot loop may pass --max-images-per-request first).
SHORTENS = frozenset(
    {"context_length_exceeded", "too_many_images", "too_many_videos", "media_budget_exceeded"}
)


async def fitted(
    body: Translated,
    services: Services,
    attempt: Attempt[T],
    request: Request | None = None,
) -> T:
    """attempt(the body's chat request); a prompt past the context (or its media limits) is
    tried again shorter as long as the body can shorten it (the Responses API's truncation):
    one span more each time while the checks before building refuse it (cheap), then, with
    `request`, at the fewest spans that fit once a built prompt is too long (fewest_spans).
    Errors are named as the body names its fields."""
    searched = request is None
    try:
        while True:
            try:
                return await attempt(translated_request(body, services))
            except ServerError as exc:  # the chat route named its own fields
                if exc.code not in SHORTENS:
                    raise
                built = isinstance(exc, PromptTooLong) and exc.built
                search = built and not searched and body.truncated() < body.truncatable()
                if not search:
                    if shorten(body):
                        continue
                    raise
            searched = True
            await fewest_spans(body, services, request)  # type: ignore[arg-type]
    except ServerError as exc:
        body.name_error(exc)
        raise


async def fewest_spans(body: Translated, services: Services, request: Request) -> int | None:
    """Leaves out the fewest of the body's oldest spans with which its prompt fits, and returns
    that prompt's tokens; None where none fits (all that may go is left out). As many as are
    left out now are known not to fit. One span more at a time while the checks before
    building refuse (too many images, images alone past the context: cheap), then doubling
    while built prompts are too long, and halving back (a long tool loop's prompt built a few
    times, not once per step left out)."""
    most = body.truncatable()
    short, fits, count, step = body.truncated(), None, None, 1  # (spans: too few, enough)
    while fits is None and short < most:
        spans = min(short + step, most)
        body.truncate(spans)
        count, built = await _fitting_tokens(body, services, request)
        if count is not None:
            fits = spans
        else:
            short, step = spans, step * 2 if built else 1
    if fits is None:
        return None
    while fits - short > 1:
        spans = (short + fits) // 2
        body.truncate(spans)
        tokens, _ = await _fitting_tokens(body, services, request)
        if tokens is not None:
            fits, count = spans, tokens
        else:
            short = spans
    body.truncate(fits)
    return count


async def _fitting_tokens(
    body: Translated, services: Services, request: Request
) -> tuple[int | None, bool]:
    """The body's prompt as it is now truncated, built (media read, nothing run): its tokens
    if it fits the context and the media limits, else None; and whether it was built (its
    images decoded) or refused by the checks before (images that alone pass the context)."""
    chat = translated_request(body, services)
    try:
        inputs = await until_disconnected(request, services.chat.prompt(chat, whole=True))
    except ServerError as exc:
        if exc.code in SHORTENS:
            return None, False
        raise
    # (as the answer's check: room for max_tokens, or for one token where none was asked)
    room = services.engine.max_seq_len - (chat.sampling.max_tokens or 1)
    return (inputs.num_prompt_tokens if inputs.num_prompt_tokens <= room else None), True


async def run_translated(
    body: Translated, request: Request, services: Services
) -> ChatResult | Started:
    """The body's whole answer, or (stream) its run started."""

    async def run(chat: ChatRequest) -> ChatResult | Started:
        if not body.stream:
            return await until_disconnected(request, services.chat.complete(chat))
        run = await until_disconnected(request, services.chat.start(chat))
        outputs = services.chat.outputs(run.seq)
        try:
            first = await until_disconnected(request, anext(outputs))
        except ServerError as exc:  # (a constraint that failed at the first token)
            chat.name_error(exc)
            raise
        return Started(chat, run, first, outputs)

    return await fitted(body, services, run, request)


async def prompt_tokens(body: Translated, request: Request, services: Services) -> int:
    """The tokens the body's prompt takes: built as its answer's would be (shortened as its
    answer's would be, where it can be), media read, nothing run."""
    try:
        if body.truncatable():
            count, _ = await _fitting_tokens(body, services, request)
            if count is None:
                count = await fewest_spans(body, services, request)
            if count is not None:
                return count
        # (one that nothing fits: counted as it would be left, past the context)
        chat = translated_request(body, services)
        return (await until_disconnected(request, services.chat.prompt(chat))).num_prompt_tokens
    except ServerError as exc:
        body.name_error(exc)
        raise
