"""JSON as RFC 8259 has it. Python's json reads and writes NaN, Infinity and -Infinity, which
are no JSON: a body holding one read as a field out of range, and a model's tool call holding
one came back as arguments no client could parse."""

from __future__ import annotations

import json
from typing import Any


def _not_json(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def loads(text: bytes | str) -> Any:
    """json.loads without NaN and the infinities (json.JSONDecodeError, a ValueError)."""
    return json.loads(text, parse_constant=_not_json)


def dumps(value: Any) -> str:
    """json.dumps as calls are written: non-ASCII kept; a NaN or an infinity (1e999 reads as
    one) is a ValueError."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False)
