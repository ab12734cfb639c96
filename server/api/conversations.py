"""OpenAI's Conversations API on the wire (`client.conversations`): a conversation with
metadata and its items, which a response names by `conversation` (see server/api/responses.py
and server/jobs/conversations.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, Field

from server.api.fields import MetadataDict, MetadataPairs, StrictModel
from server.api.responses import InputItem, ItemReference, ResponsesRequest
from server.api.services import Services
from server.api.translated import translated_request
from server.exceptions import InvalidRequest, ServerError

MAX_ITEMS_PER_CALL = 20  # OpenAI's, for a create and an items create
NEXT_TURN = "-"  # a turn after the items, as a response adds one (items alone may hold none)


def check_items(items: list[Any], param: str) -> None:
    """Items a conversation can hold: themselves, not references to stored ones."""
    for index, item in enumerate(items):
        if isinstance(item, ItemReference):
            raise InvalidRequest(
                f"{param}[{index}] refers to a stored item ({item.id}): send the item itself.",
                param=f"{param}[{index}]",
                code="unsupported_parameter",
            )


async def check_readable(
    items: list[dict[str, Any]], services: Services, num_new: int | None = None
) -> None:
    """A conversation's items (those it has, then the last `num_new` (all: None), which the
    request adds) as a response will read them: a function call's output after its call,
    the new items' media no more than a request may hold (a response with truncation "auto"
    leaves older ones out), images sent inline or by file id readable, and so on (images by
    URL are read when a response runs). Else a 400
    naming the item (a new one as the request has it: items[i]), before it is added: a
    conversation that cannot be read stops every response in it."""
    if not items:
        return
    model = services.served_model_names[0]
    reader = ResponsesRequest(model=model, input=NEXT_TURN, conversation="-")
    chat = services.chat
    try:
        reader.continue_from(items)
        # (CPU work: in a thread)
        messages = (await asyncio.to_thread(translated_request, reader, services)).messages
        if num_new is not None:  # (the media the request adds: a response truncates the rest)
            messages = reader.messages_of(messages, [item["id"] for item in items[-num_new:]])
        await chat.media.check_ahead(messages, chat.media.check_counts(messages))
    except ServerError as exc:
        reader.name_error(exc)
        exc.param = "items"
        new = items if num_new is None else items[len(items) - num_new :]
        for index, item in enumerate(new):  # (their ids are the server's: never seen yet)
            named = f"conversation item {item['id']}"
            if named in exc.message:
                exc.message = exc.message.replace(named, f"items[{index}]")
                exc.param = f"items[{index}]"
        raise


class ConversationCreate(StrictModel):
    metadata: MetadataPairs = None
    items: list[InputItem] | None = Field(default=None, max_length=MAX_ITEMS_PER_CALL)


class ConversationUpdate(StrictModel):
    metadata: MetadataDict


class ItemsCreate(StrictModel):
    items: list[InputItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_CALL)


class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True
