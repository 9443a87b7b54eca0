"""The mediator's events, batched per recipient and encoded once (sans-I/O).

The glue (overlay/server/app.py) drains ``Mediator.outgoing`` once per event-loop turn, not once
per request, and hands it to ``coalesce``: per recipient, in order, a ``members`` event (a delta:
records of members that came, changed or went online / offline) is merged into the recipient's
previous ``members`` event of the same network, up to ``MEMBER_BATCH`` records, so a storm of
presence changes (every node reconnecting after a restart) costs each member one message per turn
and network rather than one per change. A record that appears twice keeps its order: the later
one wins on the node, as it would have as two messages.

``Encoder`` turns an event into the bytes of its JSON text once however many recipients share it
(the mediator pushes one dict object to every member it concerns), and a ``members`` event from its
records' texts, each record encoded once (the mediator shares a network's records between the
snapshots of one turn, and a merged event reuses the deltas' records). The bytes are what ``json.dumps`` gives (``Channel.send``): the control
protocol does not change.
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Iterable

from overlay.control.messages import MEMBER_BATCH


def _dumps_py(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# json.dumps with these options builds an encoder per call, which costs more than encoding a
# record; one C encoder, made once, gives the same text at a fifth of the cost per record
_c_encoder = (c_make_encoder(None, json.JSONEncoder().default, encode_basestring, None, ":", ",", False, False, True)
              if c_make_encoder is not None else None)


def _dumps(obj) -> str:
    if _c_encoder is None:
        return _dumps_py(obj)
    return "".join(_c_encoder(obj, 0))


class _Merged(dict):
    """A ``members`` event built here (owned by one recipient, so it may grow)."""


def coalesce(items: Iterable[tuple[bytes, dict]]) -> dict[bytes, list[dict]]:
    """``(recipient, event)`` pairs in order -> each recipient's events in order, adjacent
    ``members`` events of one network merged (at most ``MEMBER_BATCH`` records per event)."""
    out: dict[bytes, list[dict]] = {}
    for key, msg in items:
        queue = out.get(key)
        if queue is None:
            out[key] = [msg]
            continue
        last = queue[-1]
        if (msg.get("t") == "members" and last.get("t") == "members" and last["network"] == msg["network"]
                and len(last["members"]) + len(msg["members"]) <= MEMBER_BATCH):
            if not isinstance(last, _Merged):      # shared with other recipients: copy before growing
                last = queue[-1] = _Merged(t="members", network=last["network"], members=list(last["members"]))
            last["members"].extend(msg["members"])
        else:
            queue.append(msg)
    return out


class Encoder:
    """JSON text of events, each distinct event (and each record of a merged one) encoded once.
    One per batch: it caches by object identity, which holds only while the batch is alive."""

    def __init__(self):
        self._events: dict[int, bytes] = {}
        self._records: dict[int, str] = {}
        self._keep: list = []      # the objects cached by id(), alive until the encoder is dropped
        self.encoded = 0           # json.dumps calls (for tests)

    def encode(self, msg: dict) -> bytes:
        data = self._events.get(id(msg))
        if data is not None:
            return data
        if isinstance(msg, _Merged) or (msg.get("t") == "members" and list(msg) == ["t", "network", "members"]):
            # a snapshot batch or a delta: its records may be shared with other events (the
            # mediator builds a network's records once per turn), each is encoded once
            recs = []
            for r in msg["members"]:
                text = self._records.get(id(r))
                if text is None:
                    text = self._records[id(r)] = _dumps(r)
                    self._keep.append(r)
                    self.encoded += 1
                recs.append(text)
            data = f'{{"t":"members","network":{_dumps(msg["network"])},"members":[{",".join(recs)}]}}'.encode()
        else:
            data = _dumps(msg).encode()
            self.encoded += 1
        if not isinstance(msg, _Merged):     # a merged event has one recipient
            self._events[id(msg)] = data
            self._keep.append(msg)
        return data
