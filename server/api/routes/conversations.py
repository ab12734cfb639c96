"""OpenAI's Conversations API (`client.conversations`): create, read, update and delete a
conversation, and add, list, read and delete its items. A response with `conversation` reads
its items as history and adds its own (server/api/routes/responses.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query

from server.api.body import ThreadParsedRoute
from server.api.conversations import (
    ConversationCreate,
    ConversationDeleted,
    ConversationObject,
    ConversationUpdate,
    ItemsCreate,
    check_items,
    check_readable,
)
from server.api.fields import check_metadata
from server.api.protocol import ErrorResponse
from server.api.responses import InputItemList, item_records
from server.api.services import Services, get_services
from server.exceptions import ConversationNotFound, KeepsNothing
from server.jobs.project import current_project
from server.pipelines.conversation_lock import ConversationLock

router = APIRouter(
    route_class=ThreadParsedRoute,
    tags=["conversations"],
    responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 503)},
)
ItemOrder = Literal["asc", "desc"]


@router.post("/v1/conversations", response_model=ConversationObject)
async def create_conversation(
    body: ConversationCreate, services: Services = Depends(get_services)
) -> ConversationObject:
    """A new conversation, with up to 20 first items."""
    if not services.store_responses:
        raise KeepsNothing("conversation")
    check_metadata(body.metadata)
    check_items(body.items or [], "items")
    items = item_records(body.items or [])
    await check_readable(items, services)
    made = await asyncio.to_thread(
        services.jobs.create_conversation,
        f"conv_{uuid.uuid4().hex}",
        body.metadata or {},
        items,
        current_project(),
    )
    return ConversationObject.model_validate(made)


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationObject)
async def retrieve_conversation(
    conversation_id: str, services: Services = Depends(get_services)
) -> ConversationObject:
    return ConversationObject.model_validate(await _conversation(conversation_id, services))


@router.post("/v1/conversations/{conversation_id}", response_model=ConversationObject)
async def update_conversation(
    conversation_id: str, body: ConversationUpdate, services: Services = Depends(get_services)
) -> ConversationObject:
    """Its metadata replaced."""
    check_metadata(body.metadata)
    updated = await asyncio.to_thread(
        services.jobs.update_conversation, conversation_id, body.metadata, current_project()
    )
    if updated is None:
        raise ConversationNotFound(conversation_id)
    return ConversationObject.model_validate(updated)


@router.delete("/v1/conversations/{conversation_id}", response_model=ConversationDeleted)
async def delete_conversation(
    conversation_id: str, services: Services = Depends(get_services)
) -> ConversationDeleted:
    """The conversation and its items (the responses made in it stay, if stored)."""
    if not await asyncio.to_thread(
        services.jobs.delete_conversation, conversation_id, current_project()
    ):
        raise ConversationNotFound(conversation_id)
    return ConversationDeleted(id=conversation_id)


@router.post("/v1/conversations/{conversation_id}/items", response_model=InputItemList)
async def add_items(
    conversation_id: str, body: ItemsCreate, services: Services = Depends(get_services)
) -> InputItemList:
    """Up to 20 items after its last; the answer lists them, with their ids. Not while a
    response takes its turn in the conversation (the items would land inside its turn)."""
    check_items(body.items, "items")
    items = item_records(body.items)
    holder = f"items_{uuid.uuid4().hex}"
    lock = ConversationLock(
        services.jobs, conversation_id, holder, current_project(), param="conversation_id"
    )
    await lock.take()
    try:
        await check_readable(await _items(conversation_id, services) + items, services, len(items))
        if not await asyncio.to_thread(
            services.jobs.add_items, conversation_id, items, current_project()
        ):
            raise ConversationNotFound(conversation_id)
    except BaseException:
        lock.release_soon()
        raise
    await lock.release()
    return InputItemList.page(items, len(items), "asc", None, conversation_id)


@router.get("/v1/conversations/{conversation_id}/items", response_model=InputItemList)
async def list_items(
    conversation_id: str,
    limit: int = Query(default=20, ge=1, le=100),
    order: ItemOrder = "desc",
    after: str | None = Query(default=None, max_length=200, description="the last id seen"),
    services: Services = Depends(get_services),
) -> InputItemList:
    """Its items, newest first unless order=asc."""
    items = await _items(conversation_id, services)
    return InputItemList.page(items, limit, order, after, f"conversation {conversation_id}")


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def retrieve_item(
    conversation_id: str, item_id: str, services: Services = Depends(get_services)
) -> dict[str, Any]:
    for item in await _items(conversation_id, services):
        if item["id"] == item_id:
            return item
    raise ConversationNotFound(conversation_id, param="item_id", item=item_id)


@router.delete(
    "/v1/conversations/{conversation_id}/items/{item_id}", response_model=ConversationObject
)
async def delete_item(
    conversation_id: str, item_id: str, services: Services = Depends(get_services)
) -> ConversationObject:
    """The item out of the conversation; the answer is the conversation."""
    conversation = await _conversation(conversation_id, services)
    if not await asyncio.to_thread(
        services.jobs.delete_item, conversation_id, item_id, current_project()
    ):
        raise ConversationNotFound(conversation_id, param="item_id", item=item_id)
    return ConversationObject.model_validate(conversation)


async def _conversation(conversation_id: str, services: Services) -> dict[str, Any]:
    conversation = await asyncio.to_thread(
        services.jobs.get_conversation, conversation_id, current_project()
    )
    if conversation is None:
        raise ConversationNotFound(conversation_id)
    return conversation


async def _items(conversation_id: str, services: Services) -> list[dict[str, Any]]:
    items = await asyncio.to_thread(
        services.jobs.conversation_items, conversation_id, current_project()
    )
    if items is None:
        raise ConversationNotFound(conversation_id)
    return items
