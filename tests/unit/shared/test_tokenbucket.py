from overlay.tokenbucket import TokenBucket


def test_burst_then_rate():
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(0.05)          # half a token
    assert b.take(0.1)               # one token after 0.1 s at 10/s
    assert not b.take(0.1)


def test_refill_caps_at_burst_and_clock_going_back_takes_nothing():
    b = TokenBucket(rate=100, burst=5, now=0.0, tokens=0)
    assert b.level(1000.0) == 5
    assert b.take(1000.0, 5) and not b.take(999.0)   # an earlier `now` refills nothing
    assert not b.full(1000.02) and b.full(1000.1)


def test_take_many_is_all_or_nothing():
    b = TokenBucket(rate=1, burst=10, now=0.0)
    assert not b.take(0.0, 11)
    assert b.level(0.0) == 10
    assert b.take(0.0, 10) and b.level(0.0) == 0
