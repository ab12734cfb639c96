"""Structured output: JSON constrained during decoding with xgrammar.

A sequence with a StructuredOutput carries its own GrammarMatcher; before each sampling step the
matcher's token bitmask removes every token that would break the JSON (or the schema), and the
end-of-text token is allowed only once the document is complete. So the output is valid and
schema-conformant even from a random-weight model, given max_tokens room to finish.

Compiling a schema against a large vocabulary takes seconds, so compiled grammars are cached per
schema (a bounded, least-recently-used cache); pipelines compile off the event loop before a
request is queued, and the engine thread only builds matchers from the cache.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from server.engine.transfer import to_device

logger = logging.getLogger(__name__)

# A JSON schema nested deeper than this (in JSON levels) is refused: compiling grows about as
# the cube of the depth (on the CPU: 0.2 s at 128 levels of arrays, 1.6 s at 256, 32 s at 450),
# and one request's compile would hold the others' back. OpenAI allows 10 levels of objects.
MAX_SCHEMA_DEPTH = 128
# What a schema's grammar is made of, bounded as OpenAI bounds structured outputs: at most
# 5,000 properties, and 120,000 characters of property and definition names, enum and const
# values (a compile grows faster than those: 50,000 enum strings took a minute of a compile
# thread; descriptions cost nothing and are not counted).
MAX_SCHEMA_PROPERTIES = 5_000
MAX_SCHEMA_CHARS = 120_000
# Keywords whose values are data, not schemas: a {"$ref": ...} inside one is left as it is.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# Keywords whose values map names to schemas (a property may be named "enum").
NAMED_SCHEMAS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def json_depth(text: str) -> int:
    """The deepest nesting of objects and arrays in a JSON text (strings skipped), in one pass
    without building it."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def check_schema_depth(text: str, wrapper_depth: int = 0) -> None:
    """Raises InvalidSchema past MAX_SCHEMA_DEPTH levels (less those the server's own wrapping
    adds)."""
    depth = json_depth(text) - wrapper_depth
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidSchema(f"it is nested {depth} levels deep; the limit is {MAX_SCHEMA_DEPTH}")


def check_schema_size(schema: object) -> None:
    """Raises InvalidSchema past MAX_SCHEMA_PROPERTIES or MAX_SCHEMA_CHARS."""
    properties = chars = 0
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in NAMED_SCHEMAS and isinstance(value, dict):
                properties += len(value) if key == "properties" else 0
                chars += sum(map(len, value))
                stack.extend(value.values())
            elif key in ("enum", "const"):
                values = value if key == "enum" and isinstance(value, list) else [value]
                chars += sum(map(_value_chars, values))
            elif key not in DATA_KEYWORDS and isinstance(value, dict | list):
                stack.append(value)  # (a default or an example is a value, not a schema)
    if properties > MAX_SCHEMA_PROPERTIES:
        raise InvalidSchema(
            f"it has {properties} properties; the limit is {MAX_SCHEMA_PROPERTIES:,} (OpenAI's)"
        )
    if chars > MAX_SCHEMA_CHARS:
        raise InvalidSchema(
            f"its property and definition names, enum and const values are {chars:,} "
            f"characters; the limit is {MAX_SCHEMA_CHARS:,} (OpenAI's)"
        )


def _value_chars(value: object) -> int:
    """A value's characters as written: a string's own (a CJK character is one), else its
    compact JSON."""
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


@dataclass(frozen=True)
class StructuredOutput:
    kind: Literal["json_object", "json_schema", "regex", "grammar"]
    # The constraint's text (hashable, the cache key): the schema's canonical JSON, the
    # regex, or the EBNF grammar.
    schema_json: str | None = None
    # The request's cache_salt, part of the cache key only: a grammar another tenant compiled
    # is not found (a fast answer would tell that it was used).
    cache_salt: str | None = None
    # Levels the server's own wrapping adds around the client's schemas (a `required` tool
    # choice's list of calls): the depth limit is the client's schemas'.
    wrapper_depth: int = 0
    # The client's `strict: true`: a keyword the grammar cannot enforce is a 400 (UNENFORCED),
    # not a schema followed as far as it goes.
    strict: bool = False
    # Tools the answer may call instead (tool_choice auto beside a response_format, as OpenAI
    # takes the pair): {"tools": [[name, parameters], ...], "parallel": bool} as JSON. The
    # answer is then this constraint's text or the calls, as the checkpoint writes them.
    calls: str | None = None

    @classmethod
    def json_schema(
        cls, schema: dict[str, Any], wrapper_depth: int = 0, strict: bool = False
    ) -> StructuredOutput:
        # Key order is kept: properties are generated in the order the schema lists them.
        if strict:
            schema = strict_normalized(schema)
        return cls("json_schema", json.dumps(schema), wrapper_depth=wrapper_depth, strict=strict)

    def or_calls(self, tools: list[tuple[str, dict[str, Any]]], parallel: bool) -> StructuredOutput:
        """This constraint, or calls of these (name, parameters) tools instead."""
        return replace(self, calls=json.dumps({"tools": tools, "parallel": parallel}))

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> StructuredOutput:
        """An EBNF grammar (xgrammar's GBNF dialect) whose start rule is `root`, or one in
        Lark's syntax (start rule `start`; see is_lark)."""
        return cls("grammar", ebnf)

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        """Exactly one of the strings, as plain text (vLLM's guided_choice, built as vLLM
        builds it for xgrammar: an alternation of EBNF string literals)."""
        # JSON string literals are EBNF string literals: quotes, backslashes, newlines and
        # control characters escaped alike.
        literals = (json.dumps(c, ensure_ascii=False) for c in choices)
        return cls.grammar("root ::= " + " | ".join(literals))


# xgrammar (0.2.9) writes a string with minLength / maxLength as a bounded repeat of this
# character class, which lets raw control characters through (JSON forbids them: the answer
# would not parse; its issue #800): such a schema's grammar is compiled with the class JSON
# allows instead (no escapes inside, as before: quotes, backslashes and line breaks were
# already out of it). Its classes also take an encoded surrogate (ED A0 80: not UTF-8, three
# U+FFFD in the text where a bound counted one character): every JSON string's class leaves
# them out. As str(Grammar) writes them.
BOUNDED_CHARACTER = r"[^\"\\\r\n]"
JSON_CHARACTER = r"[^\"\\\0-\x1f\uD800-\uDFFF]"
STRING_CHARACTER = r"[^\0-\x1f\"\\\r\n]"  # an unbounded string's
TEXT_CHARACTER = r"[^\0-\x1f\"\\\r\n\uD800-\uDFFF]"


# Keywords xgrammar reads past without enforcing them (an answer could break them): a strict
# schema with one is refused, as OpenAI's strict mode refuses most of them.
UNENFORCED = frozenset(
    {
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "multipleOf",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
# Where a schema holds schemas: by name, in a list, or one.
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "additionalItems")


def unenforced(schema: Any, at: str = "") -> list[str]:
    """Where the schema uses what the grammar would not enforce ("properties.tags.uniqueItems").
    Property names are names, not keywords: only schema positions are read."""
    if not isinstance(schema, dict):
        return []
    found = [
        f"{at}{key}"
        for key in schema
        if key in UNENFORCED and not (key == "multipleOf" and whole_multiple(schema))
    ]
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        found.append(f"{at}allOf (of several schemas)")
    if isinstance(schema.get("pattern"), str) and writes_raw_escapes(schema["pattern"]):
        found.append(f"{at}pattern (a quote, backslash or control character, written raw)")
    lengths = "minLength" in schema or "maxLength" in schema
    found += [
        f"{at}{key} with minLength/maxLength"
        for key in ("pattern", "format")
        if lengths and key in schema
    ]
    for key in SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                found += unenforced(sub, f"{at}{key}.{name}.")
    for key in SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                found += unenforced(sub, f"{at}{key}[{i}].")
    for key in SCHEMA_VALUES:
        found += unenforced(schema.get(key), f"{at}{key}.")
    return found


def with_subschemas(schema: dict[str, Any], change: Callable[[Any], Any]) -> dict[str, Any]:
    """A copy of the schema with each schema it holds (by name, in a list, or one) changed."""
    changed = dict(schema)
    for key in SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            changed[key] = {name: change(sub) for name, sub in schema[key].items()}
    for key in (*SCHEMA_LISTS, *SCHEMA_VALUES):
        if key in schema:
            changed[key] = change(schema[key])
    return changed


def strict_normalized(schema: Any) -> Any:
    """A strict schema as OpenAI's Structured Outputs answer it: every property of every
    object written (OpenAI refuses a strict schema whose `required` leaves one out; here it is
    made required, so the promise holds, and the answer still fits the schema as sent). Left
    optional where forcing could leave no finite answer: a property that refers elsewhere
    ($ref: it may recurse), and the properties of an object with maxProperties."""
    if isinstance(schema, list):
        return [strict_normalized(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    normalized = with_subschemas(schema, strict_normalized)
    properties = schema.get("properties")
    if isinstance(properties, dict) and "maxProperties" not in schema:
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        forced = [name for name, sub in properties.items() if "$ref" not in json.dumps(sub)]
        normalized["required"] = [*required, *(name for name in forced if name not in required)]
    return normalized


def strict_refusal(found: list[str]) -> str:
    """Why a strict schema is refused, given unenforced's findings."""
    return (
        f"strict, it uses what constrained decoding here cannot enforce: {', '.join(found[:5])} "
        "(without strict, the schema is followed as far as it can be)"
    )


def whole_multiple(schema: dict[str, Any]) -> bool:
    """Whether the schema's multipleOf is one xgrammar enforces: a positive whole number on
    integers alone (it writes the digits through a remainder automaton; on numbers it warns
    and ignores the keyword)."""
    step = schema.get("multipleOf")
    kinds = schema.get("type")
    integers = kinds == "integer" or (isinstance(kinds, list) and "number" not in kinds)
    return integers and isinstance(step, int) and not isinstance(step, bool) and step > 0


def writes_raw_escapes(pattern: str) -> bool:
    r"""Whether a string `pattern` can match a character JSON must escape (a quote, a
    backslash, a control character) spelt out: xgrammar writes such a character raw, not
    escaped (the answer would not parse). `.`, `\s` and negated classes are safe: xgrammar
    keeps those characters out of them."""
    negated: bool | None = None  # inside a class: whether it is negated; None: outside
    i = 0
    while i < len(pattern):
        char, nxt = pattern[i], pattern[i + 1 : i + 2]
        if char == "\\" and nxt:
            escape = pattern[i + 1 : i + 6]
            raw = (
                nxt in '"\\tnrfv0c' or escape[:2] in ("x0", "x1") or escape[:4] in ("u000", "u001")
            )
            if raw and negated is not True:
                return True
            i += 2
        elif negated is None and char == "[":
            negated = nxt == "^"
            i += 2 if negated else 1
        elif negated is not None and char == "]":
            negated, i = None, i + 1
        elif (char == '"' or ord(char) < 0x20) and negated is not True:
            return True
        else:
            i += 1
    return False


# RFC 3339's dates and times as patterns that take only real ones: xgrammar's own `format`
# grammars take any day up to 31 in any month ("2023-02-31") and second 60, which Python's
# datetime (so pydantic, which OpenAI's SDKs parse answers with) refuses. Leap years exact;
# year 0000 out (datetime's years are 1 to 9999).
YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][48]|[13579][26]|[2468]0)00)"
MONTH_DAY = (
    r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
DATE = rf"(?:{YEAR}-{MONTH_DAY}|{LEAP_YEAR}-02-29)"
TIME = (
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
FORMAT_PATTERNS = {"date": DATE, "time": TIME, "date-time": f"{DATE}T{TIME}"}


def exact_formats(schema: Any) -> Any:
    """The schema with each string's `format` date, time or date-time (and no pattern of its
    own) written as the pattern of real ones. Only schema positions are read (a property
    named "format" is a name)."""
    if isinstance(schema, list):
        return [exact_formats(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    exact = with_subschemas(schema, exact_formats)
    pattern = FORMAT_PATTERNS.get(schema.get("format"))  # type: ignore[arg-type]
    if pattern is not None and "pattern" not in schema:
        del exact["format"]
        exact["pattern"] = f"^{pattern}$"
    return exact


class InvalidSchema(ValueError):
    """The JSON schema cannot be compiled to a grammar."""


# xgrammar's messages start with its C++ log prefix, "[08:08:19] /project/cpp/x.cc:4944: ",
# and an assertion's own text ("Check failed: (val >= MIN_INT64_AS_DOUBLE) is false: "),
# neither of which says anything to the client.
_CPP_LOG_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


# A comment line of either grammar syntax (EBNF's `#`, Lark's `//`).
GRAMMAR_COMMENT = re.compile(r"(#|//).*$")


def is_lark(grammar: str) -> bool:
    """Whether a grammar is written in Lark's syntax (`start: "a" | b`) rather than EBNF's
    (`root ::= ...`): none of its rules is defined with `::=` (vLLM's test)."""
    lines = (GRAMMAR_COMMENT.sub("", line).strip() for line in grammar.splitlines())
    return not any("::=" in line for line in lines if line)


def schema_error_text(exc: Exception) -> str:
    """The grammar library's complaint without its source location, first line, bounded."""
    first = (str(exc).strip().splitlines() or ["invalid JSON schema"])[0]
    return _CPP_LOG_PREFIX.sub("", first)[:200] or "invalid JSON schema"


class GrammarCache:
    """Compiled grammars by constraint, least recently used first out past MAX_BYTES (a server
    answering per-request schemas, e.g. categories lists, would otherwise keep every one it ever
    compiled). xgrammar's own cache is off: this one counts the bytes and is the only one."""

    MAX_BYTES = 512 * 2**20

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: tuple[int, ...],
        max_seconds_per_token: float = 0.0,
    ):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.vocab_size = vocab_size
        # Ids no grammar takes (the model's padding past the tokenizer's vocabulary): xgrammar
        # refuses them with a line of its own on stderr, outside the server's log format.
        self.special_token_ids = frozenset(info.special_token_ids) - frozenset(stop_token_ids)
        # A sequence's matcher may take this much CPU per token (0: any), see sampler._too_slow
        self.max_seconds_per_token = max_seconds_per_token
        self.max_bytes = self.MAX_BYTES
        # Pipelines compile on worker threads, the engine thread builds matchers: one lock.
        self._lock = threading.Lock()
        self._grammars: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self.num_bytes = 0

    def lookup(self, spec: StructuredOutput) -> Any | None:
        """The compiled grammar if it is cached (now the most recently used), else None."""
        with self._lock:
            grammar = self._grammars.get(spec)
            if grammar is not None:
                self._grammars.move_to_end(spec)
            return grammar

    def compile(self, spec: StructuredOutput) -> Any:
        if (grammar := self.lookup(spec)) is not None:
            return grammar
        if spec.kind == "json_schema":
            check_schema_depth(spec.schema_json or "", spec.wrapper_depth)
            check_schema_size(json.loads(spec.schema_json or "{}"))
        elif spec.kind == "grammar" and "%json" in (spec.schema_json or ""):
            check_schema_depth(spec.schema_json or "")  # a Lark grammar's inline JSON schema
        if spec.strict and (found := unenforced(json.loads(spec.schema_json or "{}"))):
            raise InvalidSchema(strict_refusal(found))
        try:
            grammar = self._grammar(spec)
            if spec.calls is not None:
                grammar = self._or_calls(grammar, spec.calls)
            grammar = self.compiler.compile_grammar(grammar)
        except Exception as exc:  # xgrammar raises several types for bad schemas
            raise InvalidSchema(schema_error_text(exc)) from None
        if not self.allows_a_start(grammar):  # ("root ::= root", the regex "[^\s\S]")
            raise InvalidSchema("it matches no text (no token can start it)")
        with self._lock:
            if spec not in self._grammars:
                self._grammars[spec] = grammar
                self.num_bytes += grammar.memory_size_bytes
            # The newest stays, whatever its size: the request that compiled it is about to
            # start. (A queued request holds its grammar from the engine's add_request on; one
            # evicted before that is compiled again when it starts: rare, slow, not wrong.)
            while self.num_bytes > self.max_bytes and len(self._grammars) > 1:
                _, oldest = self._grammars.popitem(last=False)
                self.num_bytes -= oldest.memory_size_bytes
        return grammar

    def _grammar(self, spec: StructuredOutput) -> Any:
        """The constraint's xgrammar Grammar (not compiled yet)."""
        grammars = self.xgr.Grammar
        if spec.kind == "regex":
            return grammars.from_regex(spec.schema_json)
        if spec.kind == "grammar":
            text = spec.schema_json or ""
            if is_lark(text):  # vLLM reads these too (its older docs' form, `start: ...`)
                return grammars.from_lark(text)
            return grammars.from_ebnf(text)
        # json_object is OpenAI's "some JSON object": an object, any keys.
        schema = spec.schema_json if spec.kind == "json_schema" else '{"type": "object"}'
        return self._json_grammar(schema or "{}")

    def _json_grammar(self, schema: str) -> Any:
        if '"format"' in schema:
            schema = json.dumps(exact_formats(json.loads(schema)))
        # Compact JSON (any_whitespace=False): whitespace runs cannot eat max_tokens.
        grammar = self.xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        text = str(grammar)
        mended = text.replace(BOUNDED_CHARACTER, JSON_CHARACTER)
        mended = mended.replace(STRING_CHARACTER, TEXT_CHARACTER)
        if mended != text:
            try:
                return self.xgr.Grammar.from_ebnf(mended)
            except Exception:  # (str(Grammar) that does not read back: as xgrammar builds it)
                logger.warning("a JSON schema's grammar did not read back; compiled as it was")
        return grammar

    def _or_calls(self, grammar: Any, calls: str) -> Any:
        """The grammar, or the checkpoint's own tool calls (Qwen's Hermes blocks, one per
        line: `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`), each with its
        function's arguments. A tool whose parameters cannot be compiled (or are past a
        schema's bounds) is left out, logged: tools under tool_choice auto were never
        compiled before they could be called beside a format."""
        wanted = json.loads(calls)
        tags = []
        for name, parameters in wanted["tools"]:
            try:
                tags.append(self._call_tag(name, parameters))
            except Exception as exc:
                logger.warning("tool %s not callable beside the response format: %s", name, exc)
        if not tags:
            return grammar
        calls_format = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": "\n",
            "at_least_one": True,
            "stop_after_first": not wanted["parallel"],
        }
        structural = {"type": "structural_tag", "format": calls_format}
        try:
            tools = self.xgr.Grammar.from_structural_tag(json.dumps(structural))
        except Exception as exc:
            logger.warning("tools not callable beside the response format: %s", exc)
            return grammar
        return self.xgr.Grammar.union(grammar, tools)

    def _call_tag(self, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """One function's call block, its arguments under its parameters' grammar."""
        schema = json.dumps(parameters)
        check_schema_depth(schema)
        check_schema_size(parameters)
        quoted = json.dumps(name, ensure_ascii=False)
        return {
            "type": "tag",
            "begin": f'<tool_call>\n{{"name": {quoted}, "arguments": ',
            "content": {"type": "grammar", "grammar": str(self._json_grammar(schema))},
            "end": "}\n</tool_call>",
        }

    def allows_a_start(self, grammar: Any) -> bool:
        """Whether any token (or the end, for a grammar of the empty text) can come first."""
        return self.allows_a_token(self.xgr.GrammarMatcher(grammar))

    def allows_a_token(self, matcher: Any) -> bool:
        """Whether any token (or the end) can come next where the matcher stands."""
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        return bool(bitmask.any())

    def matcher(self, spec: StructuredOutput, grammar: Any = None) -> Any:
        """A matcher of `grammar` (the sequence's own, held since it was queued), or of the
        cache's grammar for `spec`, compiled again if it was evicted."""
        return self.xgr.GrammarMatcher(grammar if grammar is not None else self.compile(spec))

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Mask the given rows of logits [batch, vocab] in place with their filled bitmask rows
        (bitmask: [batch, words] on the host)."""
        if logits.is_cuda:
            self.apply_on_device(logits, bitmask, rows)
        else:
            self.xgr.apply_token_bitmask_inplace(
                logits, bitmask, vocab_size=self.vocab_size, indices=rows, backend="cpu"
            )

    def apply_on_device(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """`apply` where the logits are (CUDA; any device in tests), with no host sync: the rows'
        bitmask and their indices go through pinned, non-blocking copies, and the rows are
        masked by xgrammar's plain-torch backend, whose own `indices` (a host list) torch would
        copy to the device, waiting, at each use. (xgrammar's default backend on CUDA compiles
        a Triton kernel at first use, which needs a C compiler.)"""
        device = logits.device
        where = to_device(rows, device, torch.long)
        masks = to_device(bitmask[rows], device)  # only the constrained rows cross
        masked = logits.index_select(0, where)
        self.xgr.apply_token_bitmask_inplace(
            masked, masks, vocab_size=self.vocab_size, backend="torch_native"
        )
        logits.index_copy_(0, where, masked)
