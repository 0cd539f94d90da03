"""Issue 24: the bundle records the namespace's local services (UDP ports bound for any peer,
TCP ports listening), so `notrack` is suggested only where a local service answers."""

from __future__ import annotations

from pathlib import Path

from ctguard.evidence.collect import Context, listening, parse_sockets

UDP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  0: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 1 2 0 0
  1: 0100007F:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2 2 0 0
  2: 0200A8C0:D431 0800A8C0:0035 01 00000000:00000000 00:00000000 00000000  1000        0 3 2 0 0
"""
TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
  0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
  1: 0200A8C0:0016 0300A8C0:C350 01 00000000:00000000 02:0000A1B5 00000000     0        0 5 4 0 20 4 30 10 -1
"""


def test_parse_sockets_keeps_services_not_clients() -> None:
    assert parse_sockets(UDP, "07") == {53, 68}      # the connected client socket to :53 is not a service
    assert parse_sockets(TCP, "0A") == {22}


def test_the_collector_reads_the_namespace_tables(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.mkdir()
    (net / "udp").write_text(UDP)
    (net / "tcp").write_text(TCP)
    data, files = listening(Context(proc_root=tmp_path))
    assert data == {"udp_ports": [53, 68], "tcp_ports": [22]} and files == {}


def test_unknown_when_no_table_is_readable(tmp_path: Path) -> None:
    data, _ = listening(Context(proc_root=tmp_path))
    assert "udp_ports" not in data and "note" in data
