"""JSON schemas as the server takes them for structured output, before xgrammar compiles
them: the bounds on their depth and size, the keywords a grammar cannot enforce (a strict
schema with one is refused), strict mode's normal form, and the string formats written as
exact patterns."""

from __future__ import annotations

import fractions
import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any


class InvalidSchema(ValueError):
    """The JSON schema cannot be compiled to a grammar."""


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


# What an enum's or const's values are checked against here (checked_values), the others left
# out: those beside one are enforced.
VALUE_CHECKS = frozenset(
    {
        "type",
        "pattern",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
    }
)
# Keywords beside which xgrammar reads no other constraint (`{"$ref": ..., "maximum": 2}`
# wrote 6; `{"enum": ["ab", "cd"], "pattern": "^a"}` wrote "cd").
ALONE = ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")
# The keywords that constrain an answer (any other is an annotation: title, description,
# default, examples, discriminator, ...).
CONSTRAINING = UNENFORCED | VALUE_CHECKS | frozenset(ALONE) | {"format", "dependencies"}
CONSTRAINING |= {"items", "prefixItems", "additionalItems", "minItems", "maxItems"}
CONSTRAINING |= {"properties", "patternProperties", "additionalProperties", "propertyNames"}
CONSTRAINING |= {"required", "minProperties", "maxProperties"}


def unenforced(schema: Any) -> list[str]:
    """Where the schema uses what the grammar would not enforce ("properties.tags.uniqueItems").
    Property names are names, not keywords: only schema positions are read. A schema too odd
    to read so is InvalidSchema (a 400), never an error of the server's."""
    try:
        return _unenforced(schema, "", schema)
    except (RecursionError, ValueError, TypeError, OverflowError, re.error) as exc:
        raise InvalidSchema(f"it cannot be read ({type(exc).__name__})") from None


def _unenforced(schema: Any, at: str, root: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    found = [
        f"{at}{key}"
        for key in schema
        if key in UNENFORCED
        and not (key == "multipleOf" and whole_multiple(schema))
        and not (key == "uniqueItems" and schema[key] is False)  # (no constraint)
    ]
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        found.append(f"{at}allOf (of several schemas)")
    found += _beside_alone(schema, at)
    if isinstance(schema.get("oneOf"), list) and not _told_apart(schema["oneOf"], root):
        found.append(f"{at}oneOf (branches not told apart by type or value: read as anyOf)")
    if isinstance(pattern := schema.get("pattern"), str):
        if writes_raw_escapes(pattern):
            found.append(f"{at}pattern (a quote, backslash or control character, written raw)")
        if has_lookahead(pattern) and pattern not in LOOKAHEAD_FREE:
            found.append(f"{at}pattern (a lookahead, which the grammar ignores)")
        if "format" in schema and not pattern_compiles(pattern):
            found.append(f"{at}pattern (which the grammar cannot read: the format beside it is)")
    # (beside an enum or const, the values are checked against both: checked_values)
    lengths = ("minLength" in schema or "maxLength" in schema) and not (
        _values(schema) is not None and _checkable(schema)
    )
    found += [
        f"{at}{key} with minLength/maxLength"
        for key in ("pattern", "format")
        if lengths and key in schema
    ]
    for _, sub, where in subschemas(schema, at):
        found += _unenforced(sub, where, root)
    return found


def _beside_alone(schema: dict[str, Any], at: str) -> list[str]:
    """The constraints beside a keyword xgrammar reads alone (an enum's or const's values are
    checked against some: checked_values)."""
    for key in ALONE:
        if key in schema:
            checked = VALUE_CHECKS if key in ("enum", "const") else frozenset()
            beside = [k for k in schema if k in CONSTRAINING - checked and k != key]
            if key in ("enum", "const") and not _checkable(schema):
                beside.append("pattern")
            if beside:
                return [f"{at}{key} beside {', '.join(sorted(set(beside)))}"]
    return []


def _told_apart(branches: list[Any], root: Any) -> bool:
    """Whether no value fits two of a oneOf's branches, as far as their types, const and enum
    values, or a required property's const or enum values (a discriminated union's) show:
    xgrammar reads branches it cannot tell apart as anyOf (a value fitting two was written).
    Branches of values alone, or a discriminated union's, are compared at once; others a pair
    at a time, up to APART_STEPS comparisons (then not told apart)."""
    resolved = [_resolved(branch, root) for branch in branches]
    if _distinct_values(resolved) or _discriminated(resolved, root):
        return True
    budget = [APART_STEPS]  # (refs to refs make a tree of comparisons: bounded, not told apart)
    return all(
        _apart(a, b, root, budget) for i, a in enumerate(resolved) for b in resolved[i + 1 :]
    )


def _distinct_values(schemas: list[Any]) -> bool:
    """Whether every schema is a const or enum (which xgrammar reads alone) and no value is
    in two of them."""
    values = [_values(s) if isinstance(s, dict) else None for s in schemas]
    if any(v is None for v in values):
        return False
    keys = [_value_key(value) for each in values for value in each or ()]
    return len(keys) == len(set(keys))


def _discriminated(branches: list[Any], root: Any) -> bool:
    """Whether the branches are objects told apart by one property every one requires, by
    its const or enum values (pydantic's discriminated unions)."""
    if not all(isinstance(b, dict) and _objects_only(b) for b in branches):
        return False
    names = set.intersection(*({*_required(b)} & {*b["properties"]} for b in branches))
    return any(
        _distinct_values([_resolved(b["properties"][name], root) for b in branches])
        for name in sorted(names)
    )


APART_STEPS = 2_000  # comparisons a oneOf may take (4,000 branches a pair at a time took 5 s)
MAX_APART_DEPTH = 8  # (a discriminator nested deeper is not looked for; a $ref may recurse)


def _apart(a: Any, b: Any, root: Any, budget: list[int], depth: int = 0) -> bool:
    budget[0] -= 1
    if not (isinstance(a, dict) and isinstance(b, dict)) or depth > MAX_APART_DEPTH:
        return False
    if budget[0] < 0:
        return False
    for one, other in ((a, b), (b, a)):  # (a union in a union: each of its branches apart)
        if (branches := _union(one)) is not None:
            return all(_apart(_resolved(x, root), other, root, budget, depth + 1) for x in branches)
    types_a, types_b = _types(a), _types(b)
    if types_a is not None and types_b is not None and not types_a & types_b:
        return True
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None:
        return not {_value_key(v) for v in values_a} & {_value_key(v) for v in values_b}
    if not (_objects_only(a) and _objects_only(b)):  # (properties constrain objects alone)
        return False
    props_a, props_b = a["properties"], b["properties"]
    both = set(_required(a)) & set(_required(b)) & set(props_a) & set(props_b)
    return any(
        _apart(_resolved(props_a[n], root), _resolved(props_b[n], root), root, budget, depth + 1)
        for n in both
    )


def _objects_only(schema: dict[str, Any]) -> bool:
    """Whether the schema takes objects alone, by its properties (its type object or none:
    xgrammar writes only objects for an untyped schema with properties)."""
    return isinstance(schema.get("properties"), dict) and _types(schema) in (None, {"object"})


def _value_key(value: Any) -> str:
    """A JSON value as JSON Schema compares them: 1 and 1.0 equal (in arrays and objects too),
    true not 1."""
    return json.dumps(_whole(value), sort_keys=True)


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():  # (an int stays: 10**400 has no float)
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def _union(schema: dict[str, Any]) -> list[Any] | None:
    """The branches of a schema that is only a oneOf or anyOf (annotations beside it)."""
    for key in ("oneOf", "anyOf"):
        if isinstance(schema.get(key), list) and not CONSTRAINING.intersection(schema) - {key}:
            return schema[key]
    return None


def _listed(kinds: Any) -> list[Any]:
    return [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []


def _types(schema: dict[str, Any]) -> set[str] | None:
    if not isinstance(schema.get("type"), (str, list)):
        return None
    found = {kind for kind in _listed(schema["type"]) if isinstance(kind, str)}
    numbers = {"number", "integer"}  # (an integer is a number: each overlaps the other)
    return found | numbers if found & numbers else found


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    return schema["enum"] if isinstance(schema.get("enum"), list) else None


def _required(schema: dict[str, Any]) -> list[str]:
    required = schema.get("required")
    return [n for n in required if isinstance(n, str)] if isinstance(required, list) else []


def _resolved(schema: Any, root: Any) -> Any:
    """A `{"$ref": "#/..."}` as the schema it names (once; None if it names nothing)."""
    if not (isinstance(schema, dict) and isinstance(ref := schema.get("$ref"), str)):
        return schema
    if not ref.startswith("#"):
        return None
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# Lookahead patterns schema writers emit, as the same strings written without one (xgrammar
# ignores a lookahead): pydantic 2.10-2.12's Decimal as a string (a sign, digits, a point, and
# at least one digit). Others are refused under strict (_unenforced).
LOOKAHEAD_FREE = {r"^(?!^[-+.]*$)[+-]?0*\d*\.?\d*$": r"^[+-]?(\d+\.?\d*|\.\d+)$"}


def has_lookahead(pattern: str) -> bool:
    """Whether the pattern holds a lookahead, (?= or (?!, which xgrammar ignores (it warns;
    the answer could break it); a lookbehind it refuses."""
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif pattern.startswith(("(?=", "(?!"), i):
            return True
        i += 1
    return False


def checked_values(schema: Any) -> Any:
    """The schema with each enum's values (a const's value) left out where they break the
    type, pattern, lengths or bounds beside them, which xgrammar does not read beside an enum
    (none left: InvalidSchema, no text matches). Only schema positions are read."""
    if isinstance(schema, list):
        return [checked_values(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    checked = with_subschemas(schema, checked_values)
    values = _values(schema)
    if values is not None and VALUE_CHECKS.intersection(schema) and _checkable(schema):
        kept = [value for value in values if _fits(value, schema)]
        if not kept:
            beside = ", ".join(sorted(VALUE_CHECKS.intersection(schema)))
            values_text = json.dumps(values)[:80]
            raise InvalidSchema(f"no value of {values_text} keeps the {beside} beside it")
        if len(kept) < len(values):
            checked.pop("const", None)
            checked["enum"] = kept
    return checked


def _checkable(schema: dict[str, Any]) -> bool:
    """Whether Python's re reads the schema's pattern (if any), to check values with."""
    if not isinstance(pattern := schema.get("pattern"), str):
        return True
    try:
        _python_pattern(pattern)
    except (re.error, OverflowError, RecursionError, ValueError):  # (a{99999999999}, ((((...)
        return False
    return True


# What Python's re reads otherwise than ECMAScript (or not at all as ECMAScript means it): a
# pattern holding one is not checked here (beside an enum: refused under strict).
PYTHON_ONLY = re.compile(r"\{,|\\[AZzS]|\(\?[P>aiLmsux-]|[*+?}]\+")  # (ASCII \S: looser)
# Outside a class, ECMAScript's `.` is any character but a line terminator (Python's also took
# \r, U+2028 and U+2029), and `$` the very end (Python's also matched before a final newline).
ECMA_OUTSIDE_CLASS = {".": "[^\n\r\u2028\u2029]", "$": r"\Z"}


@functools.lru_cache(maxsize=256)
def pattern_compiles(pattern: str) -> bool:
    r"""Whether xgrammar compiles the pattern (not `\b`, a back-reference or `\p{L}`, say)."""
    import xgrammar as xgr  # (here only: the rest of this module reads schemas alone)

    try:
        xgr.Grammar.from_regex(mended_pattern(pattern))
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=256)  # (each enum value is checked against the same pattern)
def _python_pattern(pattern: str) -> re.Pattern[str]:
    r"""A JSON schema's (ECMAScript) pattern as Python's re reads it the same way or stricter
    (`\d` and `\w` ASCII, re.ASCII; `\s` then is too, stricter than ECMAScript's); re.error
    for one it would read otherwise (PYTHON_ONLY)."""
    if PYTHON_ONLY.search(pattern):
        raise re.error("a construct Python's re reads otherwise than JSON Schema")
    out, i, in_class = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        step = 2 if char == "\\" else 1
        piece = pattern[i : i + step]
        out.append(ECMA_OUTSIDE_CLASS.get(piece, piece) if not in_class else piece)
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        i += step
    return re.compile("".join(out), re.ASCII)


def _exact(number: float) -> fractions.Fraction:
    """A JSON number as written (0.3 is 3/10, not 0.29999999999999998890), at any size."""
    return fractions.Fraction(repr(number))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: _is_number(v) and (isinstance(v, int) or v.is_integer()),
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _fits(value: Any, schema: dict[str, Any]) -> bool:
    """Whether a value keeps the schema's VALUE_CHECKS (those not of its type pass)."""
    typed = isinstance(schema.get("type"), (str, list))
    kinds = _listed(schema.get("type"))
    if typed and not any(JSON_TYPES.get(k, bool)(value) for k in kinds):
        return False
    if isinstance(value, str):
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and not _python_pattern(pattern).search(value):
            return False
        return schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value))
    if not _is_number(value):
        return True
    bounds = [
        ("minimum", lambda b: value >= b),
        ("maximum", lambda b: value <= b),
        ("exclusiveMinimum", lambda b: value > b),
        ("exclusiveMaximum", lambda b: value < b),
        ("multipleOf", lambda b: b > 0 and _exact(value) % _exact(b) == 0),
    ]
    return all(keep(schema[key]) for key, keep in bounds if _is_number(schema.get(key)))


def whole_bounds(schema: Any) -> Any:
    """The schema with an integer's fractional bounds as the whole ones they mean (minimum 0.5
    is 1, exclusiveMaximum 2.5 is maximum 2): a valid schema, which xgrammar refused ("Integer
    constraint must be a whole number")."""
    if isinstance(schema, list):
        return [whole_bounds(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    whole = with_subschemas(schema, whole_bounds)
    kinds = _listed(schema.get("type"))
    if "integer" not in kinds or "number" in kinds:
        return whole  # (integers, maybe with null or others: ["integer", "null"])
    rounded = {
        "minimum": ("minimum", math.ceil, max),
        "maximum": ("maximum", math.floor, min),
        "exclusiveMinimum": ("minimum", lambda b: math.floor(b) + 1, max),
        "exclusiveMaximum": ("maximum", lambda b: math.ceil(b) - 1, min),
    }
    for key, (becomes, rounding, tighter) in rounded.items():
        bound = schema.get(key)
        if isinstance(bound, float) and math.isfinite(bound) and not bound.is_integer():
            del whole[key]
            other = whole.get(becomes)  # (both bounds given: the tighter is the one)
            whole[becomes] = (
                rounding(bound) if not _is_number(other) else tighter(other, rounding(bound))
            )
    return whole


def subschemas(schema: dict[str, Any], at: str) -> Iterator[tuple[str, Any, str]]:
    """Each schema the schema holds (by name, in a list, or one): its keyword, it, where."""
    for key in SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield key, sub, f"{at}{key}.{name}."
    for key in SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield key, sub, f"{at}{key}[{i}]."
    for key in SCHEMA_VALUES:
        if isinstance(schema.get(key), list):  # (draft-07's tuple: items [...])
            for i, sub in enumerate(schema[key]):
                yield key, sub, f"{at}{key}[{i}]."
        elif key in schema:
            yield key, schema[key], f"{at}{key}."


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


def prefix_items(schema: Any) -> Any:
    """The schema with draft-07's tuples (`items: [...]`, the rest under `additionalItems`)
    written as draft 2020-12's (`prefixItems: [...]`, the rest under `items`), the form
    xgrammar reads: zod's tuples come so from the Vercel AI SDK, and were a 400. (xgrammar
    writes no item past a tuple that says nothing of the rest: a subset, still valid.)"""
    if isinstance(schema, list):
        return [prefix_items(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    changed = with_subschemas(schema, prefix_items)
    if isinstance(changed.get("items"), list) and "prefixItems" not in changed:
        changed["prefixItems"] = changed.pop("items")
        if "additionalItems" in changed:
            changed["items"] = changed.pop("additionalItems")
    return changed


def schema_mistakes(schema: Any, at: str = "", branch: bool = False) -> list[str]:
    """What makes a schema wrong whatever the answer (each a 400 naming where): a `required`
    that is not a list of names, a `$ref` to another document (nothing is fetched), and a
    required property no answer may write: one its `properties` do not declare where
    additionalProperties is false (and nothing else in or around the schema could declare
    it: no composition, no condition, not a branch of one)."""
    if not isinstance(schema, dict):
        return []
    found = []
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and "://" not in ref):
        found.append(f"{at}$ref {ref!r} is not within the schema (nothing is fetched)")
    required, properties = schema.get("required"), schema.get("properties")
    if "required" in schema and not (
        isinstance(required, list) and all(isinstance(name, str) for name in required)
    ):
        found.append(f"{at}required is not an array of property names")
    elif required and isinstance(properties, dict) and not branch and _closed(schema):
        found += [
            f"{at}required names '{name}', which its properties do not declare"
            for name in required
            if name not in properties
        ][:1]
    for key, sub, where in subschemas(schema, at):
        found += schema_mistakes(sub, where, branch or key in BRANCHES)
    return found


# Keywords whose schemas apply beside the object's own (a name one declares is declared).
BRANCHES = frozenset({"allOf", "anyOf", "oneOf", "if", "then", "else", "dependentSchemas"})


def _closed(schema: dict[str, Any]) -> bool:
    """Whether an object schema takes no property but those it declares: additionalProperties
    false, and nothing beside it that could declare more."""
    others = {"patternProperties", "unevaluatedProperties", "$ref", "dependencies", *BRANCHES}
    return schema.get("additionalProperties") is False and not others.intersection(schema)


def declared_required(schema: Any) -> Any:
    """The schema with each required name its object's `properties` leave out declared as
    any value, where the object may have others (additionalProperties left out): JSON Schema
    lets it have that name, but xgrammar writes no undeclared property (an answer left it
    out, breaking `required`); now the grammar writes it."""
    if isinstance(schema, list):
        return [declared_required(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    changed = with_subschemas(schema, declared_required)
    required, properties = schema.get("required"), schema.get("properties")
    if (
        isinstance(required, list)
        and isinstance(properties, dict)
        and "additionalProperties" not in schema
        and "patternProperties" not in schema  # (its schema for the name would be lost)
        and (missing := [n for n in required if isinstance(n, str) and n not in properties])
    ):
        changed["properties"] = {**properties, **dict.fromkeys(missing, {})}
    return changed


# What an object schema may hold beside `type` and still declare nothing: annotations (and
# vendor extensions, x-...).
ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "default", "examples"}
    | {"deprecated", "readOnly", "writeOnly"}
)


def bare_object(schema: Any) -> bool:
    """{"type": "object"} with nothing but annotations: no property, nor a rule for others."""
    return (
        isinstance(schema, dict)
        and schema.get("type") == "object"
        and all(key in ANNOTATIONS or key == "type" or key.startswith("x-") for key in schema)
    )


def closed_if_bare(schema: Any) -> Any:
    """A bare object (bare_object) as one that lists no property: xgrammar reads
    {"type": "object"} as any object, and a model wrote random keys into a no-argument tool's
    call (MCP tools without inputs declare just that) where vLLM's is {}. (Only an object
    that says it is one: {} elsewhere is any value.)"""
    return {**schema, "properties": {}} if bare_object(schema) else schema


def strict_normalized(schema: Any) -> Any:
    """A strict schema as OpenAI's Structured Outputs answer it: every property of every
    object written (OpenAI refuses a strict schema whose `required` leaves one out; here it is
    made required, so the promise holds, and the answer still fits the schema as sent), and
    none it does not list (a bare {"type": "object"} too: closed_if_bare). Left
    optional where forcing could leave no finite answer: a property that refers elsewhere
    ($ref: it may recurse), and the properties of an object with maxProperties."""
    if isinstance(schema, list):
        return [strict_normalized(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    normalized = closed_if_bare(with_subschemas(schema, strict_normalized))  # (none unlisted)
    properties, required = schema.get("properties"), schema.get("required", [])
    # (a `required` that is no list stays as sent: schema_mistakes refuses it)
    normal = isinstance(properties, dict) and isinstance(required, list)
    if normal and "maxProperties" not in schema:
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
# The other formats pydantic's types write, as values their validators take: xgrammar's own
# grammars allow an octet "065" (ipaddress refuses a leading zero), 64-character and longer
# host labels, and numbers of any length in a duration (past timedelta's range) or an email
# (past email-validator's 64 characters before the @ and 63 a label; it also refuses "--" in
# a label's 3rd and 4th places and special-use top-level domains: "local", "test", ...).
# Labels here are at most 42 characters, no two hyphens together, and 5 to a hostname, so
# one is never past 253.
OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
LABEL = r"[A-Za-z0-9]{1,16}(?:-[A-Za-z0-9]{1,12}){0,2}"
TOP_DOMAIN = (  # any two letters (a country), or a common longer name
    r"(?:[A-Za-z]{2}|com|org|net|edu|gov|info|biz|app|dev|tech|cloud|online|site|store|email"
    r"|company)"
)
N = r"[0-9]{1,4}"  # (9999 years is 3.65 million days: timedelta takes 999,999,999)
SECONDS = rf"{N}(?:\.[0-9]{{1,6}})?S"
DURATION_TIME = rf"T(?:{N}H(?:{N}M)?(?:{SECONDS})?|{N}M(?:{SECONDS})?|{SECONDS})"
DURATION = (  # ISO 8601's: P, then years, months, days and/or a time part (each once, in order)
    rf"P(?:(?:{N}Y(?:{N}M)?(?:{N}D)?|{N}M(?:{N}D)?|{N}D)(?:{DURATION_TIME})?"
    rf"|{DURATION_TIME}|{N}W)"
)
FORMAT_PATTERNS = {
    "date": DATE,
    "time": TIME,
    "date-time": f"{DATE}T{TIME}",
    "ipv4": rf"{OCTET}(?:\.{OCTET}){{3}}",
    "hostname": rf"{LABEL}(?:\.{LABEL}){{0,4}}",
    "duration": DURATION,
    "email": rf"[A-Za-z0-9_+-]{{1,30}}(?:\.[A-Za-z0-9_+-]{{1,30}})?@(?:{LABEL}\.){{1,3}}"
    rf"{TOP_DOMAIN}",
}


SURROGATES = r"\ud800-\udfff"
# The code points xgrammar's regex (0.2.9) takes in forms that are not UTF-8 when a class is
# negated (`[^"]`, `.`, `\S`): after a lead byte E0 any continuation (E0 83 99, an overlong
# U+00D9), after F0 likewise (overlong four-byte forms); written as positive ranges it takes
# only the real ones. (Surrogates, ED A0 80 and on, it takes in negated classes too.) Past
# U+FFFF as `\u{...}`: a character written as itself there lets a JSON string's quotes,
# backslashes and line breaks through the pattern's negated classes, raw.
WIDE = r"\u0800-\u0fff\u{10000}-\u{3ffff}"
NEGATED_ESCAPES = {"S": r"\s", "D": r"\d", "W": r"\w"}  # \S is [^\s], and so on
CODE_ESCAPE = re.compile(r"u\{([0-9A-Fa-f]{1,6})\}|u([0-9A-Fa-f]{4})")
WIDE_ESCAPES = ("S", "D", "W", "p", "P")  # (escapes of classes that name wide characters)


def _pieces(text: str) -> Iterator[tuple[int, str]]:
    """A pattern's characters, an escape (a backslash and the character after it) as one,
    each with where it starts."""
    i = 0
    while i < len(text):
        step = 2 if text[i] == "\\" else 1
        yield i, text[i : i + step]
        i += step


def _spelt(piece: str) -> str:
    """A literal (a character, or one escaped) past U+FFFF as `\\u{...}`, others as given."""
    char = piece[-1]
    return f"\\u{{{ord(char):x}}}" if ord(char) > 0xFFFF else piece


def _literal_first(inside: str) -> str:
    """A class's inside with a first "]" or "-" escaped: it stays literal after ranges are
    written before it."""
    return "\\" + inside if inside.startswith(("]", "-")) else inside


def _but(narrow: str, json_string: bool = True) -> str:
    """A regex of any character but those of `narrow` (a class's inside, all of them below
    U+0800), as xgrammar takes only UTF-8 for it (a regex of its own, not a JSON string's
    pattern, only needs the surrogates left out)."""
    if not json_string:
        return f"[^{SURROGATES}{_literal_first(narrow)}]"
    return f"(?:[^{WIDE}{SURROGATES}{_literal_first(narrow)}]|[{WIDE}])"


def _class_end(pattern: str, start: int) -> int:
    """The index just past the class that opens at `start` (its "[")."""
    i = start + 1 + pattern.startswith("^", start + 1)
    i += pattern.startswith("]", i)  # (a "]" first is literal)
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _is_narrow(inside: str) -> bool:
    """Whether every character a class's inside names is below U+0800 (\\S and the like
    name wide ones; an escape `\\uHHHH` or `\\u{...}` is read)."""
    for i, piece in _pieces(inside):
        if piece[:1] == "\\":
            code = CODE_ESCAPE.match(inside, i + 1)
            wide = piece[1:] in WIDE_ESCAPES or bool(code and int(code[1] or code[2], 16) >= 0x800)
        else:
            wide = ord(piece) >= 0x800
        if wide:
            return False
    return True


def _mended_class(text: str, json_string: bool = True) -> str:
    """A class (`[...]`, `[^...]`) as xgrammar takes only UTF-8 for it: a negated one of
    narrow characters as _but (one of wide ones without surrogates only), a positive one with
    \\S, \\D or \\W as alternatives."""
    negated = text.startswith("[^")
    inside = text[2 if negated else 1 : -1]
    if negated and (_is_narrow(inside) or not json_string):
        return _but(inside, json_string)
    if negated:
        spelt = "".join(_spelt(piece) for _, piece in _pieces(inside))
        return f"[^{SURROGATES}{_literal_first(spelt)}]"
    negations, rest = [], ""
    for _, piece in _pieces(inside):
        if piece[:1] == "\\" and piece[1:] in NEGATED_ESCAPES:
            negations.append(_but(NEGATED_ESCAPES[piece[1:]], json_string))
        else:
            rest += _spelt(piece)
    if not negations:
        return f"[{rest}]"
    return "(?:" + "|".join(([f"[{rest}]"] if rest else []) + negations) + ")"


def mended_pattern(pattern: str, json_string: bool = True) -> str:
    r"""The pattern as xgrammar (0.2.9) compiles it right, the same strings: each optional
    group `(X)?` written `(X|)` (it compiled one that ends in a repeat wrongly:
    `^[A-Z]{2}(-[0-9]{2,4})?$` took "RO34", the group's first character dropped; date-times'
    `(\.[0-9]{1,6})?` fractions too), and each negated class, `.`, `\S`, `\D` and `\W`
    written so that it takes only UTF-8 (_mended_class); characters past U+FFFF as escapes
    (WIDE says why). Other escapes are copied as they are; lookarounds are left alone.
    json_string: a JSON schema's pattern (else a regex of its own: structured_outputs.regex,
    whose `.` takes a line break too, as xgrammar's does)."""
    out: list[str] = []
    groups: list[bool] = []  # for each open group: whether it may be rewritten
    i = 0
    while i < len(pattern):
        char = pattern[i]
        step = 2 if char == "\\" else 1
        if char == "[":
            end = _class_end(pattern, i)  # (past the end: unclosed, xgrammar's to refuse)
            whole = end <= len(pattern)
            out.append(_mended_class(pattern[i:end], json_string) if whole else pattern[i:])
            i = end
            continue
        escaped = pattern[i + 1 : i + 2] if char == "\\" else ""
        if char == "." or escaped in NEGATED_ESCAPES:  # (`.`: all but a JSON string's own)
            out.append(_but(NEGATED_ESCAPES.get(escaped, ""), json_string))
        elif char == "(":
            groups.append(not pattern.startswith(("(?=", "(?!", "(?<=", "(?<!"), i))
            out.append(char)
        elif char == ")" and groups and groups.pop() and pattern.startswith("?", i + 1):
            out.append("|)")
            i += 3 if pattern.startswith("??", i + 1) else 2  # (lazy: the same strings)
            continue
        else:
            out.append(_spelt(pattern[i : i + step]))
        i += step
    return "".join(out)


def exact_formats(schema: Any) -> Any:
    """The schema as xgrammar is given it: each string's `format` of FORMAT_PATTERNS written
    as the pattern of real ones, and every pattern's optional groups written so that xgrammar
    compiles them right. A `pattern` beside a `format` is what is written (xgrammar would
    follow the format and drop the pattern): JSON Schema asserts a pattern and only annotates
    with a format, and zod writes its check of a format as that pattern (its uuid's version
    digit, say); a pattern xgrammar cannot compile leaves the format (strict: a 400,
    _unenforced). Only schema positions are read (a property named "format" is a name)."""
    if isinstance(schema, list):
        return [exact_formats(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    exact = with_subschemas(schema, exact_formats)
    pattern = FORMAT_PATTERNS.get(schema.get("format"))  # type: ignore[arg-type]
    own = schema.get("pattern")
    if isinstance(own, str) and "format" in schema and pattern_compiles(own):
        del exact["format"]
    elif pattern is not None:  # (beside a pattern the grammar cannot read: the format)
        del exact["format"]
        exact["pattern"] = f"^{pattern}$"
    if isinstance(written := exact.get("pattern"), str):
        exact["pattern"] = mended_pattern(LOOKAHEAD_FREE.get(written, written))
    if isinstance(exact.get("patternProperties"), dict):
        exact["patternProperties"] = {
            mended_pattern(key): sub for key, sub in exact["patternProperties"].items()
        }
    return exact
