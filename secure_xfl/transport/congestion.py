"""A model-based congestion controller for aioquic (``congestion_control = "bbr"``).

aioquic ships Reno and CUBIC, which read every lost packet as congestion. On a path
with random (non-congestive) loss that caps a connection at the Mathis bound,
``MSS / RTT * 1.22 / sqrt(p)``: 0.35 MB/s at 50 ms and 1 %, measured 0.33 MB/s
(BENCHMARKS.md, "WAN"). Linux TCP on these hosts runs BBR and is not capped, so the
comparison the WAN bench makes was between two different controllers.

This controller follows the idea of BBR (Cardwell et al., "BBR: Congestion-Based
Congestion Control", ACM Queue 2016): estimate the bottleneck rate and the
propagation delay, and keep about two bandwidth-delay products in flight.

- **Delivery rate.** Every sent packet records how much had been delivered when it
  left. When it is acknowledged, the bytes delivered since then, over the longer of
  its send and ack intervals, is one rate sample (the longer interval guards against
  ack compression). The bottleneck estimate is the largest sample of the last
  ``_RATE_ROUNDS`` round trips, so a slower path is noticed within a few round trips.
- **Propagation delay.** The smallest RTT seen on the connection. The standing queue
  this controller keeps at the bottleneck only makes later samples larger, and taking
  those would inflate the window; a path whose delay grows only makes the window
  smaller than it could be, the safe direction.
- **Window.** ``cwnd = max(4 packets, rate x (2 x min_rtt + 25 ms))``: two
  bandwidth-delay products, plus what arrives while the peer may delay an ack (RFC
  9000's default ``max_ack_delay``), without which short paths starve. aioquic's pacer sends at
  ``cwnd / srtt``. Starting from the initial window, each round trip's rate sample is
  up to twice the last, which gives slow-start growth until the bottleneck is full.
- **Loss.** Random loss is not congestion, so a single lost packet changes nothing.
  A round trip that loses more than ``_LOSS_THRESHOLD`` of its packets is overflowing
  a queue: the window is capped at 0.7 x what was in flight, and the cap is raised by
  about 3 % per round trip after that (as BBRv2 bounds inflight by loss). Persistent
  congestion (RFC 9002 §7.6) restarts the estimate from the minimum window.

It is the transport's default (``TransportConfig.congestion_control``). Being gentle on
loss also makes it less fair to loss-based flows on a shared bottleneck, as TCP BBR
is; a kit that shares a congested link can pick ``cubic``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

from aioquic.quic.congestion.base import QuicCongestionControl, register_congestion_control
from aioquic.quic.packet_builder import QuicSentPacket

__all__ = ["NAME", "ModelCongestionControl"]

NAME = "bbr"

_GAIN = 2.0
# RFC 9000's default max_ack_delay: a peer may hold an ack this long, so a window of
# only 2 x rate x min_rtt starves on short paths (at 0.3 ms it is a few packets).
_ACK_DELAY_S = 0.025
_MIN_PACKETS = 4
_RATE_ROUNDS = 10
_LOSS_THRESHOLD = 0.05
_MIN_ROUND_PACKETS = 64
_CAP_BACKOFF = 0.7


class ModelCongestionControl(QuicCongestionControl):
    """Delivery-rate x min-RTT window, insensitive to random loss (see module doc)."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mds = max_datagram_size
        self._delivered = 0
        self._delivered_time = 0.0
        self._first_sent_time = 0.0
        # Per in-flight packet: (delivered, delivered_time, first_sent_time) at send.
        self._sent: dict[int, tuple[int, float, float]] = {}
        self._round = 0
        self._round_end_delivered = 0
        self._rates: collections.deque[tuple[int, float]] = collections.deque()
        self.min_rtt: float | None = None
        self._round_acked = 0
        self._round_lost = 0
        self.inflight_cap: int | None = None

    # ------------------------------------------------------------------ estimates

    @property
    def bottleneck_rate(self) -> float:
        """Largest delivery-rate sample of the recent round trips, bytes/s (0: none)."""
        return max((r for _, r in self._rates), default=0.0)

    def _update_window(self) -> None:
        window = self.congestion_window
        rate = self.bottleneck_rate
        if rate and self.min_rtt is not None:
            window = int(rate * (_GAIN * self.min_rtt + _ACK_DELAY_S))
        if self.inflight_cap is not None:
            window = min(window, self.inflight_cap)
        self.congestion_window = max(window, _MIN_PACKETS * self._mds)

    def _end_round(self) -> None:
        self._round += 1
        self._round_end_delivered = self._delivered
        total = self._round_acked + self._round_lost
        # Small rounds (the first round trips) say little: 1 loss in 10 is not 10 %.
        if total >= _MIN_ROUND_PACKETS and self._round_lost / total > _LOSS_THRESHOLD:
            inflight = max(self.bytes_in_flight, self.congestion_window)
            self.inflight_cap = max(int(_CAP_BACKOFF * inflight), _MIN_PACKETS * self._mds)
        elif self.inflight_cap is not None:
            self.inflight_cap += max(self._mds, self.inflight_cap // 32)
        self._round_acked = self._round_lost = 0
        while self._rates and self._rates[0][0] <= self._round - _RATE_ROUNDS:
            self._rates.popleft()

    def _sample(self, rate: float) -> None:
        if self._rates and self._rates[-1][0] == self._round:
            if rate > self._rates[-1][1]:
                self._rates[-1] = (self._round, rate)
        else:
            self._rates.append((self._round, rate))

    # ------------------------------------------------------------------ aioquic hooks

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes
        sent_time = packet.sent_time or 0.0
        if not self.bytes_in_flight - packet.sent_bytes:
            # Leaving idle: intervals restart here, not at the last ack before the pause.
            self._first_sent_time = self._delivered_time = sent_time
        self._sent[id(packet)] = (self._delivered, self._delivered_time, self._first_sent_time)

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._delivered += packet.sent_bytes
        self._delivered_time = now
        self._round_acked += 1
        state = self._sent.pop(id(packet), None)
        if state is None:
            return
        delivered, delivered_time, first_sent = state
        sent_time = packet.sent_time or now
        self._first_sent_time = sent_time
        interval = max(sent_time - first_sent, now - delivered_time)
        if interval > 0:
            self._sample((self._delivered - delivered) / interval)
        if delivered >= self._round_end_delivered:
            self._end_round()
        self._update_window()

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._sent.pop(id(packet), None)

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._sent.pop(id(packet), None)
            self._round_lost += 1
        self._update_window()

    def on_persistent_congestion(self) -> None:
        self._rates.clear()
        self.inflight_cap = None
        self.congestion_window = _MIN_PACKETS * self._mds

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        if rtt > 0 and (self.min_rtt is None or rtt < self.min_rtt):
            self.min_rtt = rtt
            self._update_window()

    def get_log_data(self) -> dict[str, Any]:
        data = super().get_log_data()
        data["bottleneck_rate"] = self.bottleneck_rate
        if self.min_rtt is not None:
            data["min_rtt"] = self.min_rtt
        return data


def _factory(*, max_datagram_size: int) -> QuicCongestionControl:
    return ModelCongestionControl(max_datagram_size=max_datagram_size)


register_congestion_control(NAME, _factory)
