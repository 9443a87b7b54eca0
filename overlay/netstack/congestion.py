"""Congestion window growth and reduction: NewReno (RFC 5681) and CUBIC (RFC 9438).

Only the window arithmetic lives here; loss detection, fast recovery bookkeeping (RFC 6582 /
RFC 6675) and timers are in ``tcp``. All sizes are bytes; ``mss`` is the sender's segment size.
"""

from __future__ import annotations

INITIAL_WINDOW_SEGMENTS = 10  # RFC 6928


class NewReno:
    """Slow start with appropriate byte counting (RFC 3465, L = 2) and linear avoidance."""

    name = "newreno"

    def __init__(self, mss: int):
        self.mss = mss
        self.cwnd = INITIAL_WINDOW_SEGMENTS * mss
        self.ssthresh = 1 << 30
        self._acked = 0  # bytes acknowledged towards the next +1 MSS in congestion avoidance

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None:
        """New data acknowledged outside recovery."""
        if self.cwnd < self.ssthresh:
            # every byte acknowledged, as Linux counts: a receiver acknowledging a whole batch
            # at once (one ACK per GRO batch) must not slow the start down (RFC 3465's L = 2
            # limit assumes an ACK every other segment)
            self.cwnd += acked
            return
        self._avoid(acked, now, srtt)

    def _avoid(self, acked: int, now: float, srtt: float | None) -> None:
        self._acked += acked
        if self._acked >= self.cwnd:
            self._acked -= self.cwnd
            self.cwnd += self.mss

    def on_congestion(self, flight: int, now: float) -> None:
        """Loss detected by duplicate ACKs / SACK: entering fast recovery."""
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self._acked = 0

    def on_timeout(self, flight: int, now: float) -> None:
        """Retransmission timeout: back to one segment in slow start (RFC 5681 §3.1)."""
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self._acked = 0

    def on_recovery_exit(self) -> None:
        self.cwnd = self.ssthresh


class Cubic(NewReno):
    """CUBIC window growth (RFC 9438) with fast convergence and the Reno-friendly region."""

    name = "cubic"
    C = 0.4
    BETA = 0.7

    def __init__(self, mss: int):
        super().__init__(mss)
        self._w_max = 0.0  # segments
        self._k = 0.0
        self._epoch: float | None = None
        self._w_est = 0.0  # segments, Reno-friendly estimate
        self._frac = 0.0

    def _avoid(self, acked: int, now: float, srtt: float | None) -> None:
        mss = self.mss
        cwnd_seg = self.cwnd / mss
        if self._epoch is None:
            self._epoch = now
            self._w_est = cwnd_seg
            if self._w_max <= cwnd_seg:
                self._k = 0.0
                self._w_max = cwnd_seg
            else:
                self._k = ((self._w_max - cwnd_seg) / self.C) ** (1 / 3)
        t = now - self._epoch + (srtt or 0.0)
        target = self.C * (t - self._k) ** 3 + self._w_max
        target = min(max(target, cwnd_seg), 1.5 * cwnd_seg)
        # Reno-friendly region: grow at least like AIMD with the CUBIC beta
        alpha = 3 * (1 - self.BETA) / (1 + self.BETA)
        self._w_est += alpha * (acked / mss) / cwnd_seg
        if self._w_est > target:
            target = self._w_est
        self._frac += (target - cwnd_seg) * acked / cwnd_seg  # bytes, fractional
        if self._frac >= 1.0:
            whole = int(self._frac)
            self.cwnd += whole
            self._frac -= whole

    def _reduce(self) -> None:
        cwnd_seg = self.cwnd / self.mss
        if cwnd_seg < self._w_max:  # fast convergence: release bandwidth to newer flows
            self._w_max = cwnd_seg * (1 + self.BETA) / 2
        else:
            self._w_max = cwnd_seg
        self._epoch = None

    def on_congestion(self, flight: int, now: float) -> None:
        self._reduce()
        self.ssthresh = max(int(self.cwnd * self.BETA), 2 * self.mss)
        self.cwnd = self.ssthresh
        self._acked = 0

    def on_timeout(self, flight: int, now: float) -> None:
        self._reduce()
        self.ssthresh = max(int(self.cwnd * self.BETA), 2 * self.mss)
        self.cwnd = self.mss
        self._acked = 0


CONGESTION_CONTROLS = {"newreno": NewReno, "cubic": Cubic}
