"""Peer-supplied text reaches the terminal literally: no rich markup, no escape sequences (issue 9.3)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from overlay.cli import lit, visible

NASTY = [
    "hello [/x]",                                   # a closing tag without an opening one: MarkupError
    "[link=http://evil.example]bank[/link]",        # a fake hyperlink
    "[bold red]owner[/] says: send me the password",
    "\x1b[2J\x1b]0;pwned\x07erased",                # clear screen, set the window title
    "first\nnext line 12:00:00 owner@games: fake",  # a forged second chat line
    "tab\there\rback \u202eevil",                   # carriage return, bidi override
    ":smile: [@click]x a trailing backslash \\",
    "two \\\\",
    "\\[bold]escaped?\\\\[/bold]",
]


@pytest.mark.parametrize("text", NASTY)
def test_lit_prints_text_literally(text):
    f = io.StringIO()
    Console(file=f, width=400, emoji=False).print(f"[bold]{lit(text)}[/] {lit(text)}", highlight=False,
                                                  soft_wrap=True)
    shown = f.getvalue()
    assert shown == f"{visible(text)} {visible(text)}\n"
    assert "\x1b" not in shown and "\r" not in shown and "\u202e" not in shown
    assert shown.count("\n") == 1


def test_visible_names_controls():
    assert visible("a\x1b[31mb\n\x07\x9b\u202e") == "a\\x1b[31mb\\x0a\\x07\\x9b\\u202e"
    assert visible("plain [text] é ✓") == "plain [text] é ✓"
