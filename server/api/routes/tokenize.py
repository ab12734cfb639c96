"""POST /tokenize and /detokenize, vLLM's: a prompt's token ids (and count, against the
context) before sending it, and ids back to text. A chat body's images and videos are fetched
and read as /v1/chat/completions reads them, so the count is the `prompt_tokens` its answer
would report (its max_tokens, or the answer room planned without one, sets how much of the
context a video may take). GET /tokenizer_info: the special tokens and chat template a
client-side tokenizer needs (lm-eval's remote tokenizer)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from server.api.body import ThreadParsedRoute
from server.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    image_sizes_out,
)
from server.api.routes.chat import ERRORS, to_chat_request, until_disconnected
from server.api.services import Services, get_services
from server.exceptions import InvalidRequest

router = APIRouter(route_class=ThreadParsedRoute, responses=ERRORS)


@router.post("/tokenize", response_model=TokenizeResponse, tags=["tokenize"])
async def tokenize(
    body: TokenizeRequest, request: Request, services: Services = Depends(get_services)
) -> TokenizeResponse:
    tokenizer = services.engine.tokenizer
    if isinstance(body, TokenizeChatRequest):
        # Built as the chat route builds it: the tools as tool_choice leaves them, and a
        # constrained answer's prompt (a thinking checkpoint's reasoning closed at once).
        chat = to_chat_request(body, services, services.sampling_defaults, "native")
        inputs = await until_disconnected(request, services.chat.prompt(chat))
        ids = inputs.token_ids
        sizes = inputs.image_sizes if chat.return_image_sizes else None
    else:
        if body.model is not None:
            services.check_model(body.model)
        special = body.add_special_tokens is not False
        services.engine.limits.check_prompt_text(body.prompt, "prompt", whole=False)
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt, add_special_tokens=special)
        sizes = None
    return TokenizeResponse(
        count=len(ids),
        max_model_len=services.engine.max_seq_len,
        tokens=ids,
        token_strs=tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
        image_sizes=image_sizes_out(sizes),
    )


@router.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenize"])
async def detokenize(
    body: DetokenizeRequest, services: Services = Depends(get_services)
) -> DetokenizeResponse:
    if body.model is not None:
        services.check_model(body.model)
    vocab = services.engine.runner.vocab_size
    if any(token >= vocab for token in body.tokens):
        raise InvalidRequest(
            f"tokens must be token ids below the vocabulary size ({vocab}).",
            param="tokens",
            code="invalid_value",
        )
    text = await asyncio.to_thread(services.engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)


@router.get("/tokenizer_info", response_model=TokenizerInfo, tags=["tokenize"])
async def tokenizer_info(services: Services = Depends(get_services)) -> TokenizerInfo:
    """vLLM's (there behind --enable-tokenizer-info-endpoint; here what it tells is what
    /tokenize already shows): lm-eval's remote tokenizer reads the special tokens and the chat
    template from it, then tokenizes through /tokenize and /detokenize, so an evaluation needs
    no copy of the checkpoint's tokenizer."""
    tokenizer = services.engine.tokenizer
    return TokenizerInfo(
        tokenizer_class=type(tokenizer).__name__,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
        model_max_length=services.engine.max_seq_len,
        chat_template=services.chat.input_builder.processor.chat_template,
    )
