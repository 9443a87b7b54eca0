"""The local web page of a node (`overlay ui`, issue 17): served by the daemon on loopback to the
local user only (guard.py), live over server-sent events, actions through the local API
(server.py), a small HTML/CSS/JS page without any network fetch or build step (static/).

Status (first round, issue 17 stays open):
exists: the server with its guards (secret in ui.secret 0600 -> HttpOnly SameSite=Strict cookie,
exact Host header, Origin + CSRF token on POST, CSP without inline script, no framing, nosniff,
no-referrer, no-store; bounded sizes, times, connections and streams), `--ui ADDR` / config `ui`
/ `off` (on by default, loopback only), `/events` (the status JSON when it changes, a 1.5 s
check only while a page is open, chat lines; a command refreshes the pages at once),
`POST /api/COMMAND` onto the local API (errors are the CLI's one-line messages), the page (this
node; each network with type, role, encryption, lock/approval; members with a status light,
path, RTT, tunnel traffic and a live throughput chart, interface kind, virtual IP with a copy
button; chat with history and send; ping; shares and forwards add/remove; create/join/leave;
online/offline per network; owner: approve/reject joins, kick, ban, lock/unlock, approval
on/off, type, password, the routes members offer with approve/remove), `overlay ui [--no-open]`, screenshots in docs/ made by the browser test.
Figures (benchmarks/bench_ui.py): +0.25 MB daemon RSS with the UI on and no page open, no CPU
while no page is open, 23 kB page, ~120 ms to the first status drawn (headless chromium).
Tests: tests/unit/ui, tests/process/test_ui_process.py, tests/process/test_ui_browser.py.
Missing: on the page, routes waiting for approval shown without asking (a list on demand
now), hub/gateway member choice, unban, transfer, limit, encryption and delete; chat history beyond the server's; the
browser test does not yet cover keyboard-only use beyond typing and Enter.
"""
