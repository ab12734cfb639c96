"""Bearer-token API keys (OpenAI style). No keys configured: the server is open."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


def require_api_key(request: Request) -> None:
    keys: tuple[str, ...] = request.app.state.services.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip().encode()
    # Compare against every key in constant time so timing reveals neither key nor match.
    matches = [hmac.compare_digest(presented, key.encode()) for key in keys]
    if scheme.lower() != "bearer" or not any(matches):
        raise HTTPException(
            status_code=401,
            detail="Invalid or missing API key. Send it as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
