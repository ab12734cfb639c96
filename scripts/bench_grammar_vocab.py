"""Structured output against a Qwen-sized vocabulary: what compiling a constraint costs, and
what it costs a decode step on the engine's thread to fill one row's token mask, with a
151,643-token byte-level BPE (Qwen2's size; the tiny checkpoints' tokenizers have ~576 tokens,
so no other benchmark here sees the real cost).

    python scripts/bench_grammar_vocab.py              # trains the vocabulary first (~20 s)

No real Qwen tokenizer can be downloaded here, so the vocabulary is trained offline with the
`tokenizers` library (byte-level, as Qwen's) on the Python sources of this environment's
site-packages: a code-heavy vocabulary, of the real size and shape (merges of byte pairs,
tokens of 1 to ~100 bytes). Each constraint goes through the server's own GrammarCache (the
same mended schemas, xgrammar compiler and matcher); the answer is a valid JSON document,
tokenized by that tokenizer and fed token by token as a decode step does: fill the row's mask
(timed), accept the token. Medians and 95th percentiles over every token of every round.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.engine import structured  # noqa: E402
from server.engine.structured import GrammarCache, StructuredOutput  # noqa: E402
from server.pipelines.categories import METADATA_KEYS, categories_schema  # noqa: E402

VOCAB_SIZE = 151_643
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

INVOICE = {  # (a document-extraction schema: nested objects, arrays, enums, dates, numbers)
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 80},
        "date": {"type": "string", "format": "date"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP", "JPY"]},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "item": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number", "minimum": 0},
                },
                "required": ["item", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "total": {"type": "number"},
    },
    "required": ["vendor", "date", "currency", "lines", "total"],
    "additionalProperties": False,
}
INVOICE_ANSWER = {
    "vendor": "Harbor Supplies Ltd",
    "date": "2026-03-14",
    "currency": "EUR",
    "lines": [
        {"item": "paper, A4, 500 sheets", "quantity": 4, "price": 5.49},
        {"item": "toner cartridge", "quantity": 1, "price": 79.9},
        {"item": "stapler", "quantity": 2, "price": 12.5},
    ],
    "total": 126.86,
}
CATEGORIES = categories_schema(METADATA_KEYS)  # (/v2/media/categories' default keys)
CATEGORIES_ANSWER = {
    "categories": ["harbor", "boats"],
    "participants": ["fisherman", "gull"],
    "actions": ["mooring a boat"],
    "scene": "a small harbor at dusk, boats moored along a wooden pier",
    "tags": ["dusk", "harbor", "boats"],
}
EMAIL = r"[a-z]{1,12}\.[a-z]{1,12}@[a-z]{2,12}\.com"


def trained_tokenizer(out: Path, vocab_size: int):  # noqa: ANN201
    """A byte-level BPE of vocab_size tokens, trained on site-packages' Python sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not out.exists():
        site = Path(os.__file__).parent if "site-packages" not in sys.path[-1] else None
        roots = [p for p in sys.path if p.endswith("site-packages")] or [str(site)]
        files, total = [], 0
        for path in sorted(glob.glob(f"{roots[0]}/**/*.py", recursive=True)):
            files.append(path)
            total += os.path.getsize(path)
            if total > 80e6:
                break
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=SPECIAL,
            show_progress=False,
        )
        tokenizer.train(files, trainer)
        tokenizer.save(str(out))
    return PreTrainedTokenizerFast(tokenizer_file=str(out), eos_token="<|im_end|>")


def measure(tokenizer, name: str, spec: StructuredOutput, answer: str, rounds: int) -> dict:  # noqa: ANN001
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    compile_ms, fill_us = [], []
    ids = tokenizer.encode(answer, add_special_tokens=False) + [eos]
    for _ in range(rounds):
        grammars = GrammarCache(tokenizer, len(tokenizer), (eos,))  # (nothing cached)
        started = time.perf_counter()
        grammar = grammars.compile(spec)
        compile_ms.append((time.perf_counter() - started) * 1e3)
        matcher = grammars.xgr.GrammarMatcher(grammar)
        bitmask = grammars.xgr.allocate_token_bitmask(1, grammars.vocab_size)
        for token in ids:
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            fill_us.append((time.perf_counter() - started) * 1e6)
            if not matcher.accept_token(token):
                raise SystemExit(f"{name}: the grammar refused the answer's token {token}")
    fill_us.sort()
    return {
        "constraint": name,
        "tokens": len(ids),
        "compile_ms": statistics.median(compile_ms),
        "fill_us_p50": statistics.median(fill_us),
        "fill_us_p95": fill_us[int(0.95 * (len(fill_us) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=Path("/tmp/bench_vocab/tokenizer.json"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    args.tokenizer.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = trained_tokenizer(args.tokenizer, args.vocab_size)
    print(f"vocabulary: {len(tokenizer)} tokens ({time.perf_counter() - started:.0f} s)")
    # (as the grammar writes JSON: ", " and ": " before JSON_SEPARATORS, for a run before it)
    compact = {"separators": getattr(structured, "JSON_SEPARATORS", (", ", ": "))}
    wide = {"type": "object", "properties": {f"field_{i}": {"type": "integer"} for i in range(200)}}
    cases = [
        ("json_object", StructuredOutput("json_object"), json.dumps(CATEGORIES_ANSWER, **compact)),
        ("categories schema", StructuredOutput.json_schema(CATEGORIES, strict=True),
         json.dumps(CATEGORIES_ANSWER, **compact)),
        ("invoice schema (strict)", StructuredOutput.json_schema(INVOICE, strict=True),
         json.dumps(INVOICE_ANSWER, **compact)),
        ("regex (an email)", StructuredOutput("regex", EMAIL), "first.last@example.com"),
        ("200 optional properties (not strict)", StructuredOutput.json_schema(wide),
         json.dumps({"field_0": 1, "field_7": 2, "field_199": 3}, **compact)),
    ]  # fmt: skip
    rows = [measure(tokenizer, name, spec, answer, args.rounds) for name, spec, answer in cases]
    print("| constraint | answer tokens | compile ms (median) | mask fill µs/token p50 | p95 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['constraint']} | {row['tokens']} | {row['compile_ms']:.0f} "
            f"| {row['fill_us_p50']:.0f} | {row['fill_us_p95']:.0f} |"
        )


if __name__ == "__main__":
    main()
