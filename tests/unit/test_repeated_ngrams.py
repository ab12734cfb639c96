"""No repeated n-grams: the index built as the answer grows bans what a full search would."""

from __future__ import annotations

import random

from server.engine.repeated_ngrams import RepeatedNgrams


def searched(output: list[int], n: int) -> set[int]:
    """Every token that would complete an n-gram the answer already holds (the whole search)."""
    if len(output) < n - 1:
        return set()
    tail = output[len(output) - n + 1 :] if n > 1 else []
    return {output[i + n - 1] for i in range(len(output) - n + 1) if output[i : i + n - 1] == tail}


def test_the_index_bans_what_a_search_finds_step_by_step_and_all_at_once() -> None:
    rng = random.Random(0)
    for n in (1, 2, 3, 5):
        for _ in range(20):
            output = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
            grown, whole = RepeatedNgrams(n), RepeatedNgrams(n)
            for end in range(len(output) + 1):
                assert set(grown.banned_next(output[:end])) == searched(output[:end], n)
            assert set(whole.banned_next(output)) == searched(output, n)


def test_off_and_short_answers() -> None:
    assert RepeatedNgrams.of(0) is None and RepeatedNgrams.of(-1) is None
    index = RepeatedNgrams(3)
    assert index.banned_next([]) == () and index.banned_next([7]) == ()
    assert index.banned_next([7, 8, 9, 7, 8]) == (9,)
