"""The ``bbr`` QUIC congestion controller against a simulated bottleneck (sans-IO).

A small event simulation stands in for the path: one bottleneck serialises packets at
``rate`` bytes/s behind a finite queue, each direction adds ``rtt / 2``, and packets
are dropped at random with probability ``loss``. The sender sends whenever the
controller's window allows, as aioquic does; an ack reports each packet, and a packet
is declared lost one RTT after it left (a stand-in for RFC 9002's detection).
"""

from __future__ import annotations

import heapq
import random

import pytest
from aioquic.quic.congestion.base import create_congestion_control
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket

from secure_xfl.errors import ConfigError
from secure_xfl.transport import TransportConfig
from secure_xfl.transport.congestion import NAME, ModelCongestionControl

MDS = 1452


def _packet(number: int, now: float) -> QuicSentPacket:
    return QuicSentPacket(
        epoch=3,  # type: ignore[arg-type]
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=number,
        packet_type=QuicPacketType.ONE_RTT,
        sent_time=now,
        sent_bytes=MDS,
    )


def simulate(
    name: str,
    *,
    rate: float = 12.5e6,
    rtt: float = 0.05,
    loss: float = 0.0,
    queue_packets: int = 2000,
    seconds: float = 6.0,
    seed: int = 1,
) -> tuple[float, object]:
    """Goodput (bytes/s acked over the last half) and the controller afterwards."""
    cc = create_congestion_control(name, max_datagram_size=MDS)
    rng = random.Random(seed)
    events: list[tuple[float, int, str, QuicSentPacket]] = []
    now, number, link_free, acked_late = 0.0, 0, 0.0, 0
    serial = MDS / rate
    while now < seconds:
        while cc.bytes_in_flight + MDS <= cc.congestion_window:
            p = _packet(number, now)
            number += 1
            cc.on_packet_sent(packet=p)
            queued = max(0.0, link_free - now) / serial
            if rng.random() < loss or queued > queue_packets:
                heapq.heappush(events, (now + rtt * 1.5, number, "lost", p))
                continue
            link_free = max(link_free, now) + serial
            heapq.heappush(events, (link_free + rtt, number, "ack", p))
        now, _, kind, p = heapq.heappop(events)
        if kind == "ack":
            cc.on_packet_acked(now=now, packet=p)
            cc.on_rtt_measurement(now=now, rtt=now - (p.sent_time or 0.0))
            if now > seconds / 2:
                acked_late += MDS
        else:
            cc.on_packets_lost(now=now, packets=[p])
    return acked_late / (seconds / 2), cc


def test_registered_and_configurable() -> None:
    cc = create_congestion_control(NAME, max_datagram_size=MDS)
    assert isinstance(cc, ModelCongestionControl)
    assert TransportConfig(congestion_control="bbr").congestion_control == "bbr"
    with pytest.raises(ConfigError, match="congestion_control"):
        TransportConfig(congestion_control="vegas")


def test_fills_a_clean_path_and_keeps_about_two_bdp_in_flight() -> None:
    goodput, cc = simulate(NAME)
    assert goodput > 0.9 * 12.5e6
    assert isinstance(cc, ModelCongestionControl)
    bdp = 12.5e6 * 0.05
    assert 1.5 * bdp <= cc.congestion_window <= 2.6 * bdp
    assert cc.min_rtt == pytest.approx(0.05, rel=0.05)


def test_random_loss_does_not_collapse_it_where_reno_does() -> None:
    ours, cc = simulate(NAME, loss=0.01)
    # Its state is bounded by what is in flight and a fixed number of round trips.
    assert isinstance(cc, ModelCongestionControl)
    assert len(cc._sent) <= cc.bytes_in_flight // MDS + 1
    assert len(cc._rates) <= 10
    reno, _ = simulate("reno", loss=0.01)
    assert ours > 0.85 * 12.5e6
    # Reno sits near the Mathis bound, MSS/RTT * 1.22/sqrt(p) = 0.35 MB/s.
    assert reno < 0.1 * 12.5e6
    assert ours > 10 * reno


def test_an_overflowing_queue_caps_the_window() -> None:
    # A bottleneck queue of 20 packets against a 430-packet BDP: each probe past it
    # loses a large share of a round trip, and the window must back off rather than
    # keep sending into the drop.
    _, cc = simulate(NAME, queue_packets=20, seconds=8.0)
    assert isinstance(cc, ModelCongestionControl)
    assert cc.inflight_cap is not None
    assert cc.congestion_window <= 1.6 * 12.5e6 * 0.05


def test_heavy_loss_backs_off() -> None:
    _, clean = simulate(NAME)
    _, lossy = simulate(NAME, loss=0.3)
    assert isinstance(lossy, ModelCongestionControl)
    assert lossy.inflight_cap is not None
    assert lossy.congestion_window < clean.congestion_window  # type: ignore[attr-defined]


def test_persistent_congestion_restarts_from_the_minimum_window() -> None:
    _, cc = simulate(NAME, seconds=2.0)
    assert isinstance(cc, ModelCongestionControl)
    cc.on_persistent_congestion()
    assert cc.congestion_window == 4 * MDS
    assert cc.bottleneck_rate == 0.0


def test_expired_packets_leave_no_state() -> None:
    cc = ModelCongestionControl(max_datagram_size=MDS)
    packets = [_packet(i, 0.0) for i in range(5)]
    for p in packets:
        cc.on_packet_sent(packet=p)
    cc.on_packets_expired(packets=packets)
    assert cc.bytes_in_flight == 0
    assert not cc._sent
