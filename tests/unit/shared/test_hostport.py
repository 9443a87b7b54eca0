import pytest

from overlay.hostport import parse_hostport


def test_host_port_forms():
    assert parse_hostport("example.org:7777") == ("example.org", 7777)
    assert parse_hostport("[2001:db8::7]:7777") == ("2001:db8::7", 7777)
    assert parse_hostport("laptop", default_port=22) == ("laptop", 22)
    assert parse_hostport("127.0.0.1:0", allow_zero=True) == ("127.0.0.1", 0)


@pytest.mark.parametrize("text", ["laptop", ":80", "h:0", "h:65536", "h:x", "[::1]:", "[::1:80", "::1]:80", "[[::1]]:80"])
def test_bad_forms_say_why(text):
    with pytest.raises(ValueError, match="HOST:PORT|number"):
        parse_hostport(text)
