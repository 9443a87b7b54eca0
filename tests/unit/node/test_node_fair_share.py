"""Per-member shares of a gateway's bounded tables (overlay/node/fair_share.py)."""

from overlay.node.fair_share import FairShare


def test_a_full_table_makes_room_from_the_biggest_holder_up_to_an_equal_share():
    s = FairShare(6)
    for _ in range(6):
        assert s.room_for("hog") == (True, None)
        s.add("hog")
    assert s.room_for("hog") == (False, None)          # alone: the whole table, then no more
    for _ in range(3):                                   # a newcomer takes from the hog...
        ok, victim = s.room_for("new")
        assert (ok, victim) == (True, "hog")
        s.remove(victim)
        s.add("new")
    assert s.counts == {"hog": 3, "new": 3} and len(s) == 6
    assert s.room_for("new") == (False, None)            # ...up to an equal share
    assert s.room_for("hog") == (False, None)            # and the hog cannot take it back
    assert s.room_for("third") == (True, "hog") or s.room_for("third") == (True, "new")
    s.remove("new")
    assert s.room_for("hog") == (True, None) and len(s) == 5
    s.remove("absent")                                   # nothing to remove: no change
    assert len(s) == 5 and s.counts == {"hog": 3, "new": 2}
