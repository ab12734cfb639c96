"""What the grammar cannot enforce in a strict schema (server/engine/structured.py)."""

from __future__ import annotations

import datetime
import itertools
import json
import re
from pathlib import Path

import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

from server.engine.json_schema import (
    FORMAT_PATTERNS,
    exact_formats,
    unenforced,
    writes_raw_escapes,
)
from server.engine.structured import GrammarCache, StructuredOutput, schema_error_text


@pytest.mark.parametrize(
    ("pattern", "raw"),
    [
        (r'^"[a-z]{2}$', True),  # a quote
        (r"^[A-Z]:\\[a-z]+$", True),  # a backslash
        (r"^\t[a-z]$", True),  # a tab
        (r"^[\x00-\x7f]+$", True),  # control characters in a class
        (r"^\u0001$", True),
        (r'^[^"\\]{1,8}$', False),  # a negated class keeps them out
        (r'^[^\x00-\x1f"\\]{1,32}$', False),
        (r"^[a-z\s]+$", False),  # \s and . are safe: xgrammar keeps control characters out
        (r"^.{1,5}$", False),
        (r"^\d{3}-\d{4}$", False),
        (r"^[a-z]+\.[a-z]+$", False),
    ],
)
def test_patterns_that_write_what_json_must_escape(pattern: str, raw: bool) -> None:
    assert writes_raw_escapes(pattern) is raw


def test_only_schema_positions_are_read() -> None:
    """Property names are names (a property called "not" is no keyword); enum data is data."""
    schema = {
        "type": "object",
        "properties": {
            "not": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "kind": {"enum": [{"if": 1}]},
        },
        "$defs": {"n": {"type": "number", "multipleOf": 2}},
        "anyOf": [{"allOf": [{"type": "object"}, {"required": ["not"]}]}],
    }
    assert unenforced(schema) == [
        "properties.tags.uniqueItems",
        "$defs.n.multipleOf",
        "anyOf[0].allOf (of several schemas)",
    ]


def test_a_whole_multiple_of_integers_is_enforced() -> None:
    """xgrammar writes an integer's digits through a remainder automaton for a whole
    multipleOf; a fractional one, or one on numbers, it ignores (refused under strict)."""
    assert unenforced({"type": "integer", "multipleOf": 5}) == []
    assert unenforced({"type": ["integer", "null"], "multipleOf": 3}) == []
    for schema in (
        {"type": "integer", "multipleOf": 0.5},
        {"type": "number", "multipleOf": 5},
        {"type": ["integer", "number"], "multipleOf": 5},
        {"multipleOf": 5},
        {"type": "integer", "multipleOf": True},
    ):
        assert unenforced(schema) == ["multipleOf"], schema


def test_strict_normalization_requires_what_cannot_leave_the_answer_unfinished() -> None:
    """Under strict every property is required, those named in `required` without being
    listed kept; a property that refers elsewhere (it may recurse: forced, no finite JSON
    would fit) and the properties of an object with maxProperties stay as optional as sent."""
    from server.engine.json_schema import strict_normalized

    node = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "next": {"$ref": "#"}},
        "required": ["z"],
        "additionalProperties": {"type": "string"},
    }
    assert strict_normalized(node)["required"] == ["z", "a"]
    bounded = {"type": "object", "properties": {"a": {}, "b": {}}, "maxProperties": 1}
    assert "required" not in strict_normalized(bounded)
    nested = {"type": "object", "properties": {"properties": {"properties": {"x": {}}}}}
    normalized = strict_normalized(nested)
    assert normalized["required"] == ["properties"]
    assert normalized["properties"]["properties"]["required"] == ["x"]
    assert nested["properties"]["properties"] == {"properties": {"x": {}}}  # (not changed)


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        ({"type": "integer", "minimum": -1e308}, "Integer exceeds minimum limit"),
        ({"type": "array", "minItems": 5, "maxItems": 2}, "minItems is greater than maxItems"),
    ],
)
def test_the_grammar_librarys_complaint_without_its_internals(schema: dict, said: str) -> None:
    """What reaches the client is the complaint: no C++ source location, log time or assertion
    text (xgrammar's 'Check failed: (val >= MIN_INT64_AS_DOUBLE) is false: ')."""
    with pytest.raises(RuntimeError) as raised:
        xgr.Grammar.from_json_schema(json.dumps(schema))
    assert schema_error_text(raised.value).startswith(said)


def test_date_and_time_formats_take_only_real_ones(tiny_model_dir: Path) -> None:
    """xgrammar's own `format` grammars took 2023-02-31 and second 60, which Python's datetime
    (and so pydantic, the SDKs' `parse`) refuses: the patterns here take exactly the dates
    datetime takes (checked over years around the leap rules' edges) and no leap second."""
    pattern = re.compile(FORMAT_PATTERNS["date"])
    for year in [*range(0, 30), *range(1890, 2110), *range(9990, 10000)]:
        for month, day in itertools.product(range(14), range(33)):
            text = f"{year:04d}-{month:02d}-{day:02d}"
            try:
                real = bool(datetime.date(year, month, day))
            except ValueError:
                real = False
            assert (pattern.fullmatch(text) is not None) is real, text
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    grammars = GrammarCache(tokenizer, len(tokenizer), (end,))
    schema = {
        "type": "object",
        "properties": {
            "d": {"type": "string", "format": "date"},
            "t": {"type": "string", "format": "time"},
            "dt": {"type": "string", "format": "date-time"},
            "format": {"type": "string", "format": "email"},  # (a name; a format not rewritten)
        },
        "required": ["d", "t", "dt", "format"],
    }
    grammar = grammars.compile(StructuredOutput.json_schema(schema))

    def takes(d: str, t: str, dt: str) -> bool:
        answer = json.dumps({"d": d, "t": t, "dt": dt, "format": "a@b.io"})
        matcher = xgr.GrammarMatcher(grammar)
        ids = tokenizer.encode(answer, add_special_tokens=False)
        return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(end)

    assert takes("2024-02-29", "23:59:59.5+05:30", "2000-02-29T00:00:00Z")
    assert not takes("2023-02-29", "23:59:59Z", "2000-02-29T00:00:00Z")
    assert not takes("2024-04-31", "23:59:59Z", "2000-02-29T00:00:00Z")
    assert not takes("2024-02-29", "23:59:60Z", "2000-02-29T00:00:00Z")
    assert not takes("2024-02-29", "23:59:59Z", "1900-02-29T00:00:00Z")
    assert exact_formats({"properties": {"format": {"enum": ["date"]}}}) == {
        "properties": {"format": {"enum": ["date"]}}
    }
