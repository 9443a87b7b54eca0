"""Replay window: each counter once, reordering inside the window, nothing too old."""

from __future__ import annotations

import random

from hypothesis import given, strategies as st

from overlay.wire.constants import REJECT_AFTER_MESSAGES
from overlay.wire.replay import WINDOW_SIZE, ReplayWindow


def test_window_is_at_least_2_13():
    assert WINDOW_SIZE >= 1 << 13


def test_in_order_then_duplicates_rejected():
    w = ReplayWindow()
    assert all(w.check_and_update(i, REJECT_AFTER_MESSAGES) for i in range(20000))
    assert not any(w.check_and_update(i, REJECT_AFTER_MESSAGES) for i in range(20000 - WINDOW_SIZE, 20000))


def test_out_of_order_within_window_accepted_once():
    w = ReplayWindow()
    assert w.check_and_update(10000, REJECT_AFTER_MESSAGES)
    oldest = 10000 - WINDOW_SIZE
    for c in (9999, 5000, oldest, 10000 - 8192):
        assert w.check_and_update(c, REJECT_AFTER_MESSAGES), c
        assert not w.check_and_update(c, REJECT_AFTER_MESSAGES), c


def test_too_old_rejected():
    w = ReplayWindow()
    assert w.check_and_update(50000, REJECT_AFTER_MESSAGES)
    assert not w.check_and_update(50000 - WINDOW_SIZE - 1, REJECT_AFTER_MESSAGES)
    assert not w.check_and_update(0, REJECT_AFTER_MESSAGES)


def test_limit_rejected():
    w = ReplayWindow()
    assert not w.check_and_update(REJECT_AFTER_MESSAGES, REJECT_AFTER_MESSAGES)
    assert w.check_and_update(REJECT_AFTER_MESSAGES - 1, REJECT_AFTER_MESSAGES)


def test_big_jump_clears_stale_bits():
    w = ReplayWindow()
    for c in range(0, 64 * 300, 7):
        w.check_and_update(c, REJECT_AFTER_MESSAGES)
    jump = 10**9
    assert w.check_and_update(jump, REJECT_AFTER_MESSAGES)
    # Counters that alias old ring positions must be fresh after the jump.
    for c in range(jump - 64 * 10, jump):
        assert w.check_and_update(c, REJECT_AFTER_MESSAGES)


@given(st.lists(st.integers(min_value=0, max_value=40000), max_size=400))
def test_matches_reference_model(counters):
    w = ReplayWindow()
    seen: set[int] = set()
    highest = -1
    for c in counters:
        expected = c not in seen and (highest < 0 or c > highest or highest - c <= WINDOW_SIZE)
        assert w.check_and_update(c, REJECT_AFTER_MESSAGES) == expected, c
        if expected:
            seen.add(c)
            highest = max(highest, c)


def test_shuffled_burst_within_window_all_accepted():
    rng = random.Random(7)
    w = ReplayWindow()
    for base in range(0, 100000, 4096):
        batch = list(range(base, base + 4096))
        rng.shuffle(batch)
        assert all(w.check_and_update(c, REJECT_AFTER_MESSAGES) for c in batch)
