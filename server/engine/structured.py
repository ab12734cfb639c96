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
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from server.engine.json_schema import (
    InvalidSchema,
    check_schema_depth,
    check_schema_size,
    checked_values,
    declared_required,
    exact_formats,
    mended_pattern,
    prefix_items,
    schema_mistakes,
    strict_normalized,
    strict_refusal,
    unenforced,
    whole_bounds,
)
from server.engine.transfer import to_device

logger = logging.getLogger(__name__)


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
# Nor does a string's \u escape name a surrogate (\ud8dd alone is JSON Python reads, but not
# pydantic's parser, the SDKs' `parse`; a pair is an astral character, written as itself here).
HEX = "[A-Fa-f0-9]"
ANY_ESCAPE = f'"u" {HEX} {HEX} {HEX} {HEX}'
CHARACTER_ESCAPE = f'"u" (([0-9A-Ca-cEeFf] {HEX}) | ([Dd] [0-7])) {HEX} {HEX}'

# xgrammar (0.2.9) writes a JSON number's digits unbounded: under a forced call a random model
# wrote 49756394008169e999911 and 144E-543 (Infinity and 0 to a JavaScript client, which wrote
# null back) and 44-digit integers. Here every number is a finite double: an integer part of at
# most 15 digits (so every integer is exact as a double: 10**15 < 2**53, JavaScript's safe
# bound), a fraction of at most 16 and an exponent of at most 2 (0, or between 1e-115 and 1e115
# in size: doubles reach 2.2e-308 and 1.8e308). A range's open end (a minimum and no maximum)
# keeps the bound's own length and one digit more; an integer's remainder automaton (a whole
# multipleOf up to 100) is unrolled to the same 15 digits. As str(Grammar) writes them: every
# grammar holds basic_integer and basic_number, so an xgrammar that writes neither so is
# refused (NumberRulesChanged), not left unbounded.
INTEGER_DIGITS = 15
# Between a JSON answer's items, and after its keys (see _json_grammar).
JSON_SEPARATORS = (",", ":")
FRACTION_DIGITS = 16
EXPONENT_DIGITS = 2
MAX_UNROLLED_MULTIPLE = 100  # (see _small_remainders)
DIGIT_RULE = re.compile(r"^(\w+) ::= \(\(\[0-9\]\)\)$", re.MULTILINE)  # ([0-9], named)
REMAINDER_RULE = re.compile(r"^(\w+_multiple_of_\d+_mod_\d+) ::= (.*)\n", re.MULTILINE)
REMAINDER_STEP = re.compile(r'\("(\d)" (\w+_multiple_of_\d+_mod_\d+)\)')
NUMBER_PARTS = re.compile(
    r"(?P<integer>\[1-9\] \[0-9\]\*)"  # an integer part: [1-9] [0-9]*
    r"|\[1-9\] (?P<tail>\w+)\{(?P<least>\d+), -1\}"  # a range's open end
    r'|"\." (?P<fraction>\w+)\{1, -1\}'
    r"|\[eE\] (?P<sign>\w+) (?P<exponent>\w+)\{1, -1\}"
    r"|(?P<state>\w+_multiple_of_\d+_mod_\d+)\b"
    r'|"(?:[^"\\]|\\.)*"'  # (string literals and classes as they are: names, patterns)
    r"|\[(?:[^\]\\]|\\.)*\]"
)


class NumberRulesChanged(RuntimeError):
    """xgrammar no longer writes JSON numbers as the bounds here expect (a server error)."""


def bounded_numbers(text: str) -> str:
    """A JSON schema's grammar text (str(Grammar)) with every number's digits bounded."""
    digit_rules = set(DIGIT_RULE.findall(text))
    remainders = _small_remainders(text)
    text = REMAINDER_RULE.sub(lambda rule: "" if rule[1] in remainders else rule[0], text)
    found = {"integer": 0, "fraction": 0, "exponent": 0}
    most = INTEGER_DIGITS - 1  # (after the first)

    def bound(part: re.Match[str]) -> str:
        if part["integer"]:
            found["integer"] += 1
            return f"[1-9] [0-9]{{0, {most}}}"
        if part["tail"] in digit_rules:
            least = int(part["least"])
            return f"[1-9] {part['tail']}{{{least}, {max(least, most)}}}"
        if part["fraction"] in digit_rules:
            found["fraction"] += 1
            return f'"." {part["fraction"]}{{1, {FRACTION_DIGITS}}}'
        if part["exponent"] in digit_rules:
            found["exponent"] += 1
            return f"[eE] {part['sign']} {part['exponent']}{{1, {EXPONENT_DIGITS}}}"
        if part["state"] in remainders:
            return f"{part['state']}_left{most}"
        return part[0]

    text = NUMBER_PARTS.sub(bound, text)
    if not all(found.values()):
        raise NumberRulesChanged(f"xgrammar's JSON number rules were not found to bound: {found}")
    return text + "".join(unrolled_remainders(remainders, most))


def _small_remainders(text: str) -> dict[str, str]:
    """The remainder automata (state -> its rule's body) of the whole multipleOf values up to
    MAX_UNROLLED_MULTIPLE: unrolled, an automaton takes INTEGER_DIGITS times its rules, and
    xgrammar writes them up to about 1,000 (a schema of six such fields compiled for 100 s,
    holding the compile threads every other new schema waits on). A larger one is left as
    xgrammar writes it: its digits unbounded."""
    automata: dict[str, dict[str, str]] = {}
    for rule in REMAINDER_RULE.finditer(text):
        automaton = rule[1].rsplit("_mod_", 1)[0]
        automata.setdefault(automaton, {})[rule[1]] = rule[2]
    return {
        state: body
        for states in automata.values()
        if len(states) <= MAX_UNROLLED_MULTIPLE
        for state, body in states.items()
    }


def unrolled_remainders(states: dict[str, str], most: int) -> list[str]:
    """An integer's remainder automaton (state -> its rule's body: "" where the digits so far
    are a multiple, and a step to a state per digit) as rules that take at most `most` digits
    more: state_leftK takes K at most, and steps only where the multiple can still be met."""
    steps = {state: REMAINDER_STEP.findall(body) for state, body in states.items()}
    ends = {state for state, body in states.items() if body.startswith('(""')}
    for state, body in states.items():
        if body.count(" | ") + 1 != len(steps[state]) + (state in ends):
            raise NumberRulesChanged(f"xgrammar's remainder rule was not read: {state}")
    live = [ends]  # (the states that can end in K digits or fewer)
    for _ in range(most):
        live.append({s for s in states if s in ends or any(t in live[-1] for _, t in steps[s])})
    rules = []
    for left, states_live in enumerate(live):
        for state in sorted(states_live):
            options = ['""'] if state in ends else []
            if left:
                options += [
                    f'("{digit}" {to}_left{left - 1})'
                    for digit, to in steps[state]
                    if to in live[left - 1]
                ]
            rules.append(f"{state}_left{left} ::= ({' | '.join(options)})\n")
    return rules


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
            check_schema_depth(spec.schema_json or "", spec.wrapper_depth)  # (before parsing)
            schema = json.loads(spec.schema_json or "{}")
            check_schema_size(schema)
            if mistakes := schema_mistakes(schema):
                raise InvalidSchema("; ".join(mistakes[:3]))
            if spec.strict and (found := unenforced(schema)):  # (strict: json_schema's only)
                raise InvalidSchema(strict_refusal(found))
        elif spec.kind == "grammar" and "%json" in (spec.schema_json or ""):
            check_schema_depth(spec.schema_json or "")  # a Lark grammar's inline JSON schema
        try:
            grammar = self._grammar(spec)
            if spec.calls is not None:
                grammar = self._or_calls(grammar, spec.calls)
            grammar = self.compiler.compile_grammar(grammar)
        except NumberRulesChanged:
            raise
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
            # (the same strings, as xgrammar takes only UTF-8 for them)
            return grammars.from_regex(mended_pattern(spec.schema_json or "", json_string=False))
        if spec.kind == "grammar":
            text = spec.schema_json or ""
            if is_lark(text):  # vLLM reads these too (its older docs' form, `start: ...`)
                return grammars.from_lark(text)
            return grammars.from_ebnf(text)
        # json_object is OpenAI's "some JSON object": an object, any keys.
        schema = spec.schema_json if spec.kind == "json_schema" else '{"type": "object"}'
        return self._json_grammar(schema or "{}")

    def _json_grammar(self, schema: str) -> Any:
        # (formats and patterns as xgrammar compiles them right; required names declared)
        sent = json.loads(schema)
        written = whole_bounds(prefix_items(sent))
        schema = json.dumps(exact_formats(declared_required(checked_values(written))))
        # Compact JSON, as json.dumps(separators=(",", ":")) writes it: no whitespace run can
        # eat max_tokens, and none is paid for (67 tokens where json.dumps' default took 73).
        # (Its default ", " and ": " took 14.5 s to compile an object of 200 optional
        # properties against a Qwen-sized vocabulary, 29 s for 400, each holding one of the
        # two compile threads; this: 0.03 s and 0.14 s. Any whitespace up to 2 characters
        # compiled fast too, but filled a token mask up to 9 times slower.)
        grammar = self.xgr.Grammar.from_json_schema(
            schema, any_whitespace=False, separators=JSON_SEPARATORS
        )
        text = str(grammar)
        mended = text.replace(BOUNDED_CHARACTER, JSON_CHARACTER)
        mended = mended.replace(STRING_CHARACTER, TEXT_CHARACTER)
        mended = mended.replace(ANY_ESCAPE, CHARACTER_ESCAPE)
        mended = bounded_numbers(mended)
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
            except NumberRulesChanged:
                raise
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
