"""What the grammar cannot enforce in a strict schema (server/engine/structured.py)."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import itertools
import json
import re
from pathlib import Path

import pytest
import xgrammar as xgr
from pydantic import TypeAdapter
from transformers import AutoTokenizer

from server.engine.json_schema import (
    FORMAT_PATTERNS,
    SURROGATES,
    WIDE,
    InvalidSchema,
    exact_formats,
    mended_pattern,
    schema_mistakes,
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
        "anyOf beside properties, type",  # (xgrammar reads an anyOf alone)
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


def test_strict_closes_a_bare_object_and_leaves_any_value_free() -> None:
    """Strict lists every property an object may hold: a bare {"type": "object"} (annotations
    and x- keys beside it) holds none; but {} is any value (pydantic's list[Any] items, zod's
    z.any() and z.record values), not an object: left as sent, at any depth."""
    from server.engine.json_schema import strict_normalized

    bare = {"type": "object", "description": "options", "deprecated": False, "x-order": 1}
    free = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {}}, "v": {}, "o": bare},
        "additionalProperties": {},
        "propertyNames": {},
        "$defs": {"any": {}},
    }
    normalized = strict_normalized(free)
    assert normalized["properties"]["tags"]["items"] == {}
    assert normalized["properties"]["v"] == {} and normalized["additionalProperties"] == {}
    assert normalized["propertyNames"] == {} and normalized["$defs"] == {"any": {}}
    assert normalized["properties"]["o"] == {**bare, "properties": {}}
    assert strict_normalized({}) == {}


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
        answer = json.dumps({"d": d, "t": t, "dt": dt, "format": "a@b.io"}, **COMPACT)
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


# JSON as the grammars write it (server/engine/structured.py's JSON_SEPARATORS).
COMPACT = {"separators": (",", ":")}


class Grammars(GrammarCache):
    """The tiny checkpoint's grammar cache, and whether a compiled schema takes a value."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        super().__init__(tokenizer, len(tokenizer), (self.end,))

    def takes(self, schema: dict, value: object) -> bool:
        matcher = xgr.GrammarMatcher(self.compile(StructuredOutput.json_schema(schema)))
        answer = json.dumps(value, ensure_ascii=False, **COMPACT)
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(self.end)

    def takes_bytes(self, schema: dict, raw: bytes) -> bool:
        """Whether the schema takes a JSON string of these bytes, one byte token each (as a
        random model may write them: UTF-8 or not)."""
        matcher = xgr.GrammarMatcher(self.compile(StructuredOutput.json_schema(schema)))
        ids = [self.byte_tokens[byte] for byte in b'"' + raw + b'"']
        return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(self.end)

    @functools.cached_property
    def byte_tokens(self) -> list[int]:
        """Each byte's own token (the byte-level vocabulary's printable stand-in for it)."""
        printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
        others = [byte for byte in range(256) if byte not in printable]
        chars = printable + [256 + n for n in range(len(others))]
        stand_in = dict(zip(printable + others, chars, strict=True))
        return [self.tokenizer.convert_tokens_to_ids(chr(stand_in[b])) for b in range(256)]


@pytest.fixture(scope="module")
def grammars(tiny_model_dir: Path) -> Grammars:
    return Grammars(AutoTokenizer.from_pretrained(tiny_model_dir))


BUT_ANY = rf"(?:[^{WIDE}{SURROGATES}]|[{WIDE}])"
BUT_SPACE = rf"(?:[^{WIDE}{SURROGATES}\s]|[{WIDE}])"
BUT_HYPHEN_A = rf"(?:[^{WIDE}{SURROGATES}\-a]|[{WIDE}])"
BUT_A_HYPHEN = rf"(?:[^{WIDE}{SURROGATES}a-]|[{WIDE}])"


@pytest.mark.parametrize(
    ("pattern", "written"),
    [
        ("^[A-Z]{2}(-[0-9]{2,4})?$", "^[A-Z]{2}(-[0-9]{2,4}|)$"),
        ("a(?:b(c+)?)??d", "a(?:b(c+|)|)d"),  # nested; lazy
        (r"a\\(b+)?[)(]?(x\)y)?", r"a\\(b+|)[)(]?(x\)y|)"),  # escapes, a class
        ("[]a]?(c)?[^]b](d+)?", rf"[]a]?(c|)(?:[^{WIDE}{SURROGATES}\]b]|[{WIDE}])(d+|)"),
        (r"^.\S[\s\S]$", rf"^{BUT_ANY}{BUT_SPACE}(?:[\s]|{BUT_SPACE})$"),
        (r"[^-a][^a-][^\u0900]", rf"{BUT_HYPHEN_A}{BUT_A_HYPHEN}[^{SURROGATES}\u0900]"),
        ("(?=a)?b(?!c)?", "(?=a)?b(?!c)?"),  # lookarounds left alone
        ("(a+)*(b+){0,1}", "(a+)*(b+){0,1}"),  # (xgrammar compiles these right)
    ],
)
def test_patterns_are_written_as_xgrammar_compiles_them_right(pattern: str, written: str) -> None:
    """Optional groups as empty alternatives; negated classes as UTF-8 ("]" first is
    literal, escaped where it is not first any more)."""
    assert mended_pattern(pattern) == written
    # (Python's re spells xgrammar's \u{10000} as \U00010000)
    assert re.compile(re.sub(r"\\u\{([0-9a-f]+)\}", lambda m: f"\\U{m[1]:0>8}", written))
    assert mended_pattern("a[^b") == "a[^b"  # (unclosed: xgrammar's to refuse)


def test_an_optional_group_that_ends_in_a_repeat_takes_what_the_pattern_takes(
    grammars: Grammars,
) -> None:
    """xgrammar 0.2.9 took "RO34" for this pattern (the group's "-" dropped), and date-times
    with a fraction's "." dropped ("19:40:4763"), in `pattern`, patternProperties and
    propertyNames alike."""
    code = {"type": "string", "pattern": "^[A-Z]{2}(-[0-9]{2,4})?$"}
    assert grammars.takes(code, "RO-34") and grammars.takes(code, "RO")
    assert not grammars.takes(code, "RO34")
    keyed = {"type": "object", "patternProperties": {"^k(-[0-9]+)?$": {"type": "integer"}}}
    assert grammars.takes(keyed, {"k-1": 1}) and not grammars.takes(keyed, {"k1": 1})
    names = {"type": "object", "propertyNames": code, "additionalProperties": True}
    assert not grammars.takes(names, {"RO34": 1})
    when = {"type": "string", "format": "date-time"}
    assert grammars.takes(when, "2024-01-28T19:40:47.63Z")
    assert not grammars.takes(when, "2024-01-28T19:40:4763Z")


@pytest.mark.parametrize("pattern", [r'^[^"]{1,3}$', r"^.{1,3}$", r"^\S{1,3}$", r"^[\s\S]{1,3}$"])
def test_a_negated_class_takes_utf_8_only(grammars: Grammars, pattern: str) -> None:
    """xgrammar (0.2.9) took overlong forms after E0 and F0 and encoded surrogates in these
    (a random model wrote E0 83 99, three U+FFFD where the pattern bounded one character):
    the rewritten pattern takes every real character of one to four bytes and nothing else."""
    schema = {"type": "string", "pattern": pattern}
    for real in (
        "a",
        "é",
        "ࠀ",
        "\u0fff",
        "€",
        "\ud7ff",
        "\ue000",
        "😀",
        "\U00010000",
        "\U0010ffff",
    ):
        assert grammars.takes_bytes(schema, real.encode()), real
    for wrong in ("e08399", "e08080", "eda080", "edbfbf", "f0808080", "f08fbfbf", "c080", "80"):
        assert not grammars.takes_bytes(schema, bytes.fromhex(wrong)), wrong


@pytest.mark.parametrize("pattern", [r'[^"]{1,3}', r".{1,3}", r"\S{1,3}", r"[\s\S]{1,3}"])
def test_a_regex_constraint_takes_utf_8_only(grammars: Grammars, pattern: str) -> None:
    """structured_outputs.regex (guided_regex): xgrammar's own regexes took encoded
    surrogates (ED A0 80) in negated classes; `.` and `[^"]` still take a line break, as
    they did."""
    grammar = grammars.compile(StructuredOutput.regex(pattern))

    def takes(raw: bytes) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        ids = [grammars.byte_tokens[byte] for byte in raw]
        return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(grammars.end)

    for real in ("a", "é", "ࠀ", "€", "\ud7ff", "\ue000", "😀", "\U0010ffff"):
        assert takes(real.encode()), real
    for wrong in ("eda080", "edbfbf", "e08399", "f0808080"):
        assert not takes(bytes.fromhex(wrong)), wrong
    assert takes(b"\n") is (pattern != r"\S{1,3}")  # (a line break is no JSON string's here)


@pytest.mark.parametrize("pattern", [r"^.{1,3}$", "^[^,😀]{1,3}$", "^(?:[^,]|😀){1,3}$"])
def test_a_pattern_never_writes_a_quote_backslash_or_line_break_raw(
    grammars: Grammars, pattern: str
) -> None:
    """A negated class keeps them out of a JSON string, but xgrammar (0.2.9) let them through
    once the pattern held a character past U+FFFF (here, or the rewrite's own ranges)."""
    schema = {"type": "string", "pattern": pattern}
    assert grammars.takes_bytes(schema, b"ab")
    for raw in (b'a"b', b"a\\b", b"a\nb"):
        assert not grammars.takes_bytes(schema, raw), raw


def test_the_formats_pydantic_writes_take_what_its_validators_take(
    grammars: Grammars,
) -> None:
    """ipv4 without leading zeros (ipaddress refuses "065"), host labels of at most 63
    characters, durations timedelta can hold, emails email-validator's lengths allow."""
    ipv4 = re.compile(FORMAT_PATTERNS["ipv4"])
    for octet in [*range(0, 300), "00", "01", "065", "1000"]:
        text = f"10.{octet}.0.1"
        try:
            real = bool(ipaddress.IPv4Address(text)) and str(octet) == str(int(octet))
        except ValueError:
            real = False
        assert (ipv4.fullmatch(text) is not None) is real, text
    hostname = re.compile(FORMAT_PATTERNS["hostname"])
    assert hostname.fullmatch("api.example.com") and hostname.fullmatch("localhost")
    assert hostname.fullmatch("db-prod-01.eu-west-1.rds.amazonaws.com")
    assert not hostname.fullmatch("a" * 64) and not hostname.fullmatch("-a.b")
    assert not hostname.fullmatch("ab--cd.io")  # (IDNA's place: email-validator refuses it)
    duration = re.compile(FORMAT_PATTERNS["duration"])
    for text in ("P1Y2M3DT4H5M6S", "P3W", "PT5M", "P1D", "PT1H", "P1Y35D", "PT1.5S", "PT1H30S"):
        assert duration.fullmatch(text), text
        assert TypeAdapter(datetime.timedelta).validate_python(text)  # (pydantic's reading)
    for text in ("P", "PT", "P12345D", "P1DT", "P1D1Y"):
        assert not duration.fullmatch(text), text
    email = re.compile(FORMAT_PATTERNS["email"])
    assert email.fullmatch("first.last@mail.example.com")
    assert email.fullmatch("customer-support-team@my-company.co.uk")
    assert not email.fullmatch("a" * 31 + "@b.io") and not email.fullmatch("a..b@c.io")
    for special_use in ("local", "test", "localhost", "invalid", "onion", "arpa"):
        assert not email.fullmatch(f"someone@company.{special_use}"), special_use
    for name, value in (("ipv4", "94.26.065.73"), ("duration", "P6M2507474643062D")):
        assert not grammars.takes({"type": "string", "format": name}, value)


# zod 4's z.string().uuid() and .datetime() (a format and its own pattern, both)
ZOD_UUID = (
    "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
    "|00000000-0000-0000-0000-000000000000|ffffffff-ffff-ffff-ffff-ffffffffffff)$"
)


def test_a_pattern_beside_a_format_is_what_is_enforced(grammars: Grammars) -> None:
    """xgrammar followed the format and dropped the pattern: zod's uuid, email and datetime
    schemas (both keys) got answers their own check refused."""
    uuid_schema = {"type": "string", "format": "uuid", "pattern": ZOD_UUID}
    assert grammars.takes(uuid_schema, "6f1c2a9e-3b4d-4e5f-8a9b-0c1d2e3f4a5b")
    assert not grammars.takes(uuid_schema, "eaeeaea1-b5ea-ffbe-ad43-abcccfbece4e")  # version f
    stamp = {
        "type": "string",
        "format": "date-time",
        "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$",
    }
    assert grammars.takes(stamp, "2024-01-02T03:04:05Z")
    assert not grammars.takes(stamp, "2024-01-02T03:04:05+01:00")
    assert unenforced({"type": "object", "properties": {"u": uuid_schema}}) == []
    grammars.compile(StructuredOutput.json_schema(uuid_schema, strict=True))
    # a pattern the grammar cannot read (\b) leaves the format, as before; strict: a 400
    unread = {"type": "string", "format": "date", "pattern": r"^\d{4}\b-\d{2}-\d{2}$"}
    assert grammars.takes(unread, "2024-02-29") and not grammars.takes(unread, "2023-02-29")
    assert unenforced(unread) == [
        "pattern (which the grammar cannot read: the format beside it is)"
    ]
    with pytest.raises(InvalidSchema, match="cannot read"):
        grammars.compile(StructuredOutput.json_schema(unread, strict=True))
    assert grammars.compile(StructuredOutput.json_schema({**unread, "format": "uuid"}))


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        ({"type": "object", "properties": {"a": {}}, "required": "a"}, "required is not an"),
        ({"$ref": "http://example.com/s.json"}, "$ref 'http://example.com/s.json' is not"),
        (
            {
                "type": "object",
                "properties": {"a": {}},
                "required": ["a", "zzz"],
                "additionalProperties": False,
            },
            "required names 'zzz', which its properties do not declare",
        ),
        (
            {
                "properties": {
                    "x": {"properties": {}, "required": ["y"], "additionalProperties": False}
                }
            },
            "properties.x.required names 'y'",
        ),
        ({"type": "object", "required": None}, "required is not an"),
    ],
)
def test_schemas_no_answer_can_fit_are_refused(grammars: Grammars, schema: dict, said: str) -> None:
    """Strict or not: no answer could be both what the grammar writes and the schema wants."""
    assert any(said in mistake for mistake in schema_mistakes(schema))
    for strict in (False, True):
        with pytest.raises(InvalidSchema, match=re.escape(said)):
            grammars.compile(StructuredOutput.json_schema(schema, strict=strict))


def test_required_names_something_else_may_declare_are_taken(grammars: Grammars) -> None:
    """additionalProperties, patternProperties, a composition or a condition may declare the
    name (an OpenAPI-style allOf declares it in one branch, requires it in another); a $ref
    by a sibling's $id stays in the schema."""
    integer = {"type": "integer"}
    for schema in (
        {"properties": {}, "required": ["z"], "additionalProperties": True},
        {"properties": {}, "required": ["z"], "patternProperties": {"^z$": {}}},
        {"properties": {}, "required": ["z"], "allOf": [{"properties": {"z": {}}}]},
        {"$ref": "#/$defs/a", "$defs": {"a": integer}},
        {
            "allOf": [
                {"properties": {"a": integer}},
                {"properties": {"b": integer}, "required": ["a", "b"]},
            ]
        },
        {
            "properties": {"c": integer},
            "then": {"properties": {"zip": integer}},
            "required": ["c", "zip"],
        },
        {"$defs": {"a": {"$id": "a.json", **integer}}, "properties": {"x": {"$ref": "a.json"}}},
    ):
        assert schema_mistakes(schema) == [], schema
    # Where the object may have other properties, a required one it does not declare is
    # written (xgrammar writes no undeclared property: the answer used to leave it out).
    sloppy = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city", "units"],
    }
    assert not grammars.takes(sloppy, {"city": "Oslo"})
    assert grammars.takes(sloppy, {"city": "Oslo", "units": "metric"})


def test_no_escape_names_a_lone_surrogate(grammars: Grammars) -> None:
    """\\ud8dd is JSON Python's json reads but pydantic's parser (the SDKs' `parse`) refuses;
    astral characters are written as themselves, so no escape names a surrogate."""
    text = {"type": "string"}
    grammar = grammars.compile(StructuredOutput.json_schema(text))

    def takes_raw(answer: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        ids = grammars.tokenizer.encode(answer, add_special_tokens=False)
        return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(grammars.end)

    assert takes_raw('"caf\\u00e9 \\uFFFD \\uD7FF"') and takes_raw('""')
    assert not takes_raw('"\\ud8dd"') and not takes_raw('"\\uDC00"')
    assert not takes_raw('"\\ud83d\\ude00"')  # (a pair: the character itself instead)
    assert grammars.takes(text, "😀")


def test_a_negated_class_writes_no_encoded_surrogate(grammars: Grammars) -> None:
    """xgrammar's [^...] took ED A0 80 (a surrogate, not UTF-8: three U+FFFD in the text, past
    the 12 characters the pattern bounds; seen in a CI run)."""
    byte_token = {b: grammars.tokenizer.convert_tokens_to_ids(c) for b, c in byte_chars().items()}
    spec = StructuredOutput.json_schema({"type": "string", "pattern": '^[^\\x00-\\x1f"]{1,12}$'})
    matcher = xgr.GrammarMatcher(grammars.compile(spec))
    accepted = [matcher.accept_token(byte_token[b]) for b in b'"a\xed\xa0\x80']
    assert accepted == [True, True, True, False, True]  # (ED 80 begins U+D000: real)
    assert grammars.takes({"type": "string", "pattern": '^[^\\x00-\\x1f"]{1,12}$'}, "é😀")


def byte_chars() -> dict[int, str]:
    """Byte-level BPE's character for each byte (GPT-2's table, which Qwen's tokenizer uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@pytest.mark.parametrize(
    ("schema", "said"),
    [  # xgrammar reads $ref, anyOf, oneOf, allOf, enum and const alone: what is beside them
        ({"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x", "maximum": 2}, "$ref beside"),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}], "maximum": 3}, "anyOf beside maximum"),
        ({"type": "object", "oneOf": [{"type": "integer"}]}, "oneOf beside type"),
        ({"enum": ["a", "b"], "format": "date"}, "enum beside format"),
        ({"const": "x", "pattern": "^\\p{L}$"}, "const beside pattern"),  # (re cannot read it)
        # a oneOf whose branches may overlap is read as anyOf
        (
            {"oneOf": [{"type": "integer", "maximum": 20}, {"type": "integer", "minimum": 10}]},
            "oneOf (branches not told apart",
        ),
        ({"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b", "c"]}]}, "oneOf (branches not told"),
        ({"type": "string", "pattern": "^(?!a)[ab]$"}, "pattern (a lookahead"),
        ({"type": "string", "pattern": "^(?=b)[ab]$"}, "pattern (a lookahead"),
    ],
)
def test_what_the_grammar_reads_past_is_refused_under_strict(
    grammars: Grammars, schema: dict, said: str
) -> None:
    """Under strict each of these was answered with a value that broke it (a trial's finds:
    `"cd"` for an enum beside `pattern: ^a`, 6 for a $ref beside `maximum: 2`)."""
    (found,) = unenforced(schema)
    assert found.startswith(said), found
    with pytest.raises(InvalidSchema, match=re.escape(said)):
        grammars.compile(StructuredOutput.json_schema(schema, strict=True))


def test_pydantics_decimal_pattern_is_enforced_without_its_lookahead(grammars: Grammars) -> None:
    """pydantic 2.10-2.12 write a Decimal as a number or a string of this pattern (AutoGen's,
    Haystack's, litellm's strict response_format of a model with a price: a 400 as a
    lookahead): the same strings, written without it, are enforced, strict or not."""
    pattern = r"^(?!^[-+.]*$)[+-]?0*\d*\.?\d*$"
    decimal = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": pattern}]}
    assert unenforced(decimal) == []
    grammars.compile(StructuredOutput.json_schema(decimal, strict=True))
    written = {"type": "string", "pattern": pattern}
    for text in ("12.50", "-0.5", "+.5", "7.", "007"):
        assert re.match(pattern, text) and grammars.takes(written, text), text
    for text in ("", "+", "-.", ".", "1.2.3", "1e5", "a"):  # (the lookahead's: no digit)
        assert not re.match(pattern, text) and not grammars.takes(written, text), text


def test_what_strict_takes_as_the_grammar_enforces_it(grammars: Grammars) -> None:
    """Annotations beside $ref are no constraint; a oneOf told apart by type or by a required
    property's const (a discriminated union: pydantic's) is exact; uniqueItems false asks for
    nothing; an enum's values are checked against the type, pattern, lengths and bounds beside
    it, and those that break them are never written."""
    taken = {
        "$defs": {
            "Cat": {"properties": {"kind": {"const": "cat"}}, "required": ["kind"]},
            "Dog": {"properties": {"kind": {"enum": ["dog"]}}, "required": ["kind"]},
        },
        "type": "object",
        "properties": {
            "pet": {
                "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                "discriminator": {"propertyName": "kind"},
            },
            "n": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
            "ref": {"$ref": "#/$defs/Cat", "description": "a cat", "default": None},
            "flags": {"type": "array", "items": {"type": "boolean"}, "uniqueItems": False},
            "e": {"type": "string", "enum": ["ab", "cd", 1], "pattern": "^a"},
        },
    }
    assert unenforced(taken) == []
    grammars.compile(StructuredOutput.json_schema(taken, strict=True))
    enum = {"type": "string", "enum": ["ab", "cd", 1], "pattern": "^a"}
    assert grammars.takes(enum, "ab") and not grammars.takes(enum, "cd")
    assert not grammars.takes(enum, 1)
    bounded = {"type": "integer", "enum": [1, 5, 9], "minimum": 2, "exclusiveMaximum": 9}
    assert [v for v in (1, 5, 9) if grammars.takes(bounded, v)] == [5]
    with pytest.raises(InvalidSchema, match=r'no value of \["x"\] keeps the type'):
        grammars.compile(StructuredOutput.json_schema({"const": "x", "type": "integer"}))


def test_an_integers_fractional_bounds_are_the_whole_ones_they_mean(grammars: Grammars) -> None:
    """A valid schema xgrammar refused ("Integer constraint must be a whole number")."""
    schema = {"type": "integer", "exclusiveMinimum": 0.5, "maximum": 2.5}
    assert [n for n in range(-1, 5) if grammars.takes(schema, n)] == [1, 2]
    schema = {"type": "integer", "minimum": 0.5, "exclusiveMaximum": 3.0}
    assert [n for n in range(-1, 5) if grammars.takes(schema, n)] == [1, 2]
    schema = {"type": "integer", "minimum": 3, "exclusiveMinimum": 0.5}  # (the tighter)
    assert [n for n in range(-1, 5) if grammars.takes(schema, n)] == [3, 4]
    schema = {"type": ["integer", "null"], "minimum": 0.5, "maximum": 2}  # (null beside it)
    assert [n for n in (0, 1, 2, None) if grammars.takes(schema, n)] == [1, 2, None]


def test_an_enums_values_are_checked_as_json_schema_reads_its_pattern() -> None:
    r"""Python's re read with ECMAScript's meaning, or stricter: `$` is the very end (Python's
    also matched before a final newline) and `\d` is ASCII digits (Python's took any)."""
    from server.engine.json_schema import checked_values

    schema = {"type": "string", "enum": ["a", "a\n", "\u0661", "7"], "pattern": "^(a|\\d)$"}
    assert checked_values(schema)["enum"] == ["a", "7"]
    dot = {"type": "string", "enum": ["a", "\r", "\u2028"], "pattern": "^.$"}  # (no line ends)
    assert checked_values(dot)["enum"] == ["a"]
    assert checked_values({"enum": [0.3, 0.25], "multipleOf": 0.1})["enum"] == [0.3]
    big = {"type": "integer", "enum": [10**30, 3], "multipleOf": 3}  # (past 28 digits: exact)
    assert checked_values(big)["enum"] == [3]
    # what Python reads otherwise is not checked here: beside an enum, refused under strict
    python_only = {"type": "string", "enum": ["aa", "a{,2}"], "pattern": "^a{,2}$"}
    assert checked_values(python_only) == python_only
    assert unenforced(python_only) == ["enum beside pattern"]


def test_the_strict_checks_end_on_large_and_recursive_unions() -> None:
    """4,000 const branches took 5 s a pair at a time (now one pass, as a discriminated
    union's); a oneOf of a recursive $ref recursed until Python's limit (a 500)."""
    assert unenforced({"oneOf": [{"const": i} for i in range(4000)]}) == []
    union = [
        {"type": "object", "properties": {"k": {"const": i, "type": "integer"}}, "required": ["k"]}
        for i in range(2000)
    ]
    assert unenforced({"oneOf": union}) == []
    node = {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}, "required": ["next"]}
    recursive = {"$defs": {"N": node}, "oneOf": [{"$ref": "#/$defs/N"}, {"$ref": "#/$defs/N"}]}
    (found,) = unenforced(recursive)
    assert found.startswith("oneOf (branches not told apart")


def test_a_schema_too_odd_to_read_is_invalid_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever reading a strict schema raises is the client's 400 (InvalidSchema), not a 500
    (the strict checks run outside the compile's try, and for tools in the request's check)."""
    from server.engine import json_schema

    def odd(*args: object) -> bool:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(json_schema, "_told_apart", odd)
    with pytest.raises(InvalidSchema, match=r"cannot be read \(RecursionError\)"):
        unenforced({"oneOf": [{"type": "object"}, {"type": "object"}]})


def test_a_union_in_a_union_is_told_apart_branch_by_branch() -> None:
    """pydantic's nested discriminated union (cats by breed, inside pets by kind): each of
    the inner union's branches is apart from the outer's other branch."""

    def pet(kind: str, breed: str | None = None) -> dict:
        properties = {"kind": {"const": kind}, **({"breed": {"const": breed}} if breed else {})}
        return {"type": "object", "properties": properties, "required": list(properties)}

    cats = {"oneOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}], "discriminator": {}}
    schema = {
        "$defs": {"A": pet("cat", "a"), "B": pet("cat", "b"), "D": pet("dog")},
        "type": "object",
        "properties": {"pet": {"oneOf": [cats, {"$ref": "#/$defs/D"}], "discriminator": {}}},
    }
    assert unenforced(schema) == []
    assert unenforced({"oneOf": [{"const": 10**400}, {"const": 1.0}, {"const": 1}]})  # (1 = 1.0)
    overlapping = {"oneOf": [{"anyOf": [pet("cat", "a"), pet("dog")]}, pet("dog")]}
    (found,) = unenforced(overlapping)
    assert found.startswith("oneOf (branches not told apart")
    # a second review's cases: refs to refs (a tree of comparisons) end within a budget; an
    # object told apart by properties may also be null (then both branches take null);
    # values compared as JSON compares them in arrays too; patterns Python cannot compile
    # (or reads otherwise) are not checked beside an enum, and none is a 500
    tree = {"L0": {"type": "integer"}}
    for i in range(1, 9):
        tree[f"L{i}"] = {"anyOf": [{"$ref": f"#/$defs/L{i - 1}"}] * 10}
    refs = {"$defs": tree, "oneOf": [{"$ref": "#/$defs/L8"}, {"type": "string"}]}
    assert unenforced(refs)  # (a billion comparisons otherwise)
    nullable = [pet("a") | {"type": ["object", "null"]}, pet("b") | {"type": ["object", "null"]}]
    assert unenforced({"oneOf": nullable})
    assert unenforced({"oneOf": [{"const": [1]}, {"const": [1.0]}]})
    for pattern in ("a{99999999999}", "(" * 1000 + ")" * 1000, "^\\S$"):
        assert unenforced({"enum": ["a"], "pattern": pattern}) == ["enum beside pattern"]
    # beside an enum, a pattern and a length are both checked against the values
    assert (
        unenforced({"type": "string", "enum": ["ab", "cd"], "pattern": "^a", "maxLength": 2}) == []
    )


def takes_text(grammars: Grammars, spec: StructuredOutput, text: str) -> bool:
    matcher = xgr.GrammarMatcher(grammars.compile(spec))
    ids = grammars.tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(grammars.end)


@pytest.mark.parametrize(
    ("spec", "written"),
    [
        (StructuredOutput.json_schema({"type": "number"}), "{}"),
        (StructuredOutput.json_schema({"type": ["number", "null"]}), "{}"),
        (StructuredOutput.json_schema({"anyOf": [{"type": "number"}, {"type": "string"}]}), "{}"),
        (StructuredOutput.json_schema({"type": "array", "items": {"type": "number"}}), "[{}]"),
        (StructuredOutput.json_schema({"type": "number", "multipleOf": 0.5}), "{}"),  # (inline)
        (StructuredOutput.json_schema({"properties": {"x": {"type": "number"}}}), '{{"x":{}}}'),
        (StructuredOutput.json_schema({"additionalProperties": True}), '{{"x":[{}]}}'),
        (StructuredOutput.json_schema({}), "{}"),  # any JSON value
        (StructuredOutput("json_object"), '{{"x":{{"y":{}}}}}'),
    ],
)
def test_every_number_is_a_finite_double(
    grammars: Grammars, spec: StructuredOutput, written: str
) -> None:
    """A random model under a forced call wrote 49756394008169e999911 and 144E-543 (Infinity
    and 0 to a JavaScript client, which wrote null back) and 44-digit integers: an integer part
    of at most 15 digits, a fraction of at most 16, an exponent of at most 2."""
    for number in ("0", "-1.5e-7", "12345", "-999999999999999", "0.1234567890123456", "1E+99"):
        assert takes_text(grammars, spec, written.format(number)), number
    for number in (
        "1e999",
        "1e100",
        "144E-543",
        "-6184.4E+7718",
        "49756394008169e999911",
        "1000000000000000",  # (16 digits)
        "12345678901234567890123",
        "0.12345678901234567",
    ):
        assert not takes_text(grammars, spec, written.format(number)), number


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "integer"},
        {"type": ["integer", "string"]},
        {"type": "integer", "minimum": -5},  # (a range: its open end)
        {"type": "integer", "exclusiveMaximum": 0},
        {"type": "integer", "multipleOf": 3},  # (a remainder automaton)
        {"type": "number", "exclusiveMinimum": 0.5},
    ],
)
def test_every_integer_is_an_exact_double(grammars: Grammars, schema: dict) -> None:
    """At most 15 digits: every one is exact as a double (10**15 < 2**53, JavaScript's bound)."""
    sign = -1 if schema.get("exclusiveMaximum") == 0 else 1
    assert grammars.takes(schema, sign * 999_999_999_999_999)
    assert grammars.takes(schema, sign * 123_456)
    assert not grammars.takes(schema, sign * 10**15)
    assert not grammars.takes(schema, sign * 12345678901234567890123)


def test_a_multiple_is_still_a_multiple_and_a_bound_past_15_digits_is_kept(
    grammars: Grammars,
) -> None:
    """The remainder automaton unrolled to 15 digits takes the multiples of so many digits and
    no other number; a schema's own bound of more digits is written as it says (and its open
    end takes one digit more than the bound's)."""
    sevens = {"type": "integer", "multipleOf": 7}
    assert [n for n in range(-15, 16) if grammars.takes(sevens, n)] == [-14, -7, 0, 7, 14]
    assert grammars.takes(sevens, 999_999_999_999_994)  # (7 * 142857142857142)
    assert not grammars.takes(sevens, 999_999_999_999_995)
    big = {"type": "integer", "minimum": 10**17, "maximum": 10**17 + 5}
    assert [n for n in range(10**17 - 1, 10**17 + 7) if grammars.takes(big, n)] == [
        10**17 + i for i in range(6)
    ]
    above = {"type": "integer", "minimum": 2**62}
    assert grammars.takes(above, 2**62) and grammars.takes(above, 10**19)
    assert not grammars.takes(above, 2**62 - 1) and not grammars.takes(above, 10**20)
    below = {"type": "number", "maximum": -(10**17)}
    assert grammars.takes(below, -(10**17)) and not grammars.takes(below, -(10**17) + 1)


def test_a_large_multiple_is_left_as_xgrammar_writes_it() -> None:
    """Unrolled, a remainder automaton takes 15 times its rules: one of a large multipleOf
    (xgrammar writes them up to about 1,000; six such fields compiled for 100 s) is left as
    written, its digits unbounded, and the small ones beside it are still unrolled."""
    from server.engine.structured import MAX_UNROLLED_MULTIPLE, bounded_numbers

    def written(*multiples: int) -> str:
        fields = {f"f{m}": {"type": "integer", "multipleOf": m} for m in multiples}
        schema = {"type": "object", "properties": fields, "required": list(fields)}
        return str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))

    large = MAX_UNROLLED_MULTIPLE + 1
    text = bounded_numbers(written(7, large))
    assert f"_multiple_of_{large}_mod_0_left" not in text
    assert f"_multiple_of_{large}_mod_0 ::=" in text  # (as xgrammar wrote it)
    assert "_multiple_of_7_mod_0_left14 ::=" in text
    assert len(bounded_numbers(written(997))) < 2 * len(written(997))


def test_number_rules_xgrammar_no_longer_writes_fail_loudly(
    grammars: Grammars, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bounds rewrite xgrammar's own text: an xgrammar that writes numbers otherwise is a
    server error at compile time (not a 400, nor numbers left unbounded)."""
    from server.engine import structured

    written = str(xgr.Grammar.from_json_schema('{"type": "number"}', any_whitespace=False))
    assert "[1-9] [0-9]*" in written and "basic_number_digits{1, -1}" in written
    other = written.replace("[1-9] [0-9]*", "[1-9] [0-9]{0, -1}")
    with pytest.raises(structured.NumberRulesChanged, match="not found to bound"):
        structured.bounded_numbers(other)
    changed = xgr.Grammar.from_ebnf(other)
    monkeypatch.setattr(xgr.Grammar, "from_json_schema", lambda *a, **k: changed)
    with pytest.raises(structured.NumberRulesChanged):
        grammars.compile(StructuredOutput.json_schema({"type": "number", "title": "changed"}))
