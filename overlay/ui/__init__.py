"""The local web page of a node (`overlay ui`, issue 17): served by the daemon on loopback to the
local user only (guard.py), live over server-sent events, actions through the local API (server.py),
a small HTML/CSS/JS page without any network fetch (static/).

Status (first round): exists: the server with its guards (secret -> HttpOnly SameSite=Strict
cookie, exact Host, Origin + CSRF token on POST, CSP / no framing / nosniff / no-referrer /
no-store), `--ui ADDR` / config `ui` / `off`, `/events` (status on change, 1.5 s tick only while a
page is open, chat lines), `POST /api/COMMAND` onto the local API, the page (this node, networks
with members and status lights, chat with send, ping, shares, create/join/leave, owner
approve/reject), `overlay ui [--no-open]`; tests in tests/unit/ui and tests/process/test_ui_process.py.
Missing: per-peer traffic counters and the throughput chart (the daemon's status has no per-peer
byte counts yet), forwards and the other owner actions (kick, ban, lock, password, type, routes)
on the page, a test refusing another local user, the Selenium/Chromium tests and the screenshots
for the README.
"""
