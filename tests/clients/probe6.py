#!/usr/bin/env python3
"""An AF_INET6 client for the integration tests: discovery-probe's modes
and output over explicit IPv6 sockets, as a Python service would use them.

    probe6.py [--v6only] tcp|udp|udp-connected ADDR PORT COUNT

ADDR is an IPv6 literal: ::1, or a v4-mapped ::ffff:127.0.0.1 (brackets
are allowed). Every socket is socket.AF_INET6; without --v6only it is dual
stack (IPV6_V6ONLY=0, Linux's default), so a v4-mapped ADDR reaches IPv4.
--v6only sets IPV6_V6ONLY=1 before connect/sendto: v4-mapped destinations
then fail (Linux: ENETUNREACH).

One JSON line per attempt, like discovery-probe: backend, peer, errno,
micros, at_ms, plus "error" on failure. "peer" is getpeername() (tcp,
udp-connected) or the reply's recvfrom() source (udp), printed as Rust
prints a SocketAddrV6: [addr]:port, v4-mapped as [::ffff:a.b.c.d]:port.
errno is OSError.errno; this client's own timeouts (2 s read, 5 s connect)
count as ETIMEDOUT (110), told apart by "error".
"""
import argparse
import errno
import json
import socket
import sys
import time

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 2.0


def sockaddr_text(sa):
    host, port, _flow, scope = sa
    if scope:
        host = f"{host}%{scope}"
    return f"[{host}]:{port}"


def new_socket(kind, v6only):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
    return s


def tcp(addr, port, v6only):
    with new_socket(socket.SOCK_STREAM, v6only) as s:
        s.settimeout(CONNECT_TIMEOUT)
        s.connect((addr, port, 0, 0))
        s.settimeout(READ_TIMEOUT)
        data = b""
        while b"\n" not in data:
            chunk = s.recv(512)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").strip(), sockaddr_text(s.getpeername())


def udp(addr, port, v6only, connected):
    with new_socket(socket.SOCK_DGRAM, v6only) as s:
        s.settimeout(READ_TIMEOUT)
        if connected:
            s.connect((addr, port, 0, 0))
            s.send(b"ping")
            data = s.recv(512)
            peer = s.getpeername()
        else:
            s.sendto(b"ping", (addr, port, 0, 0))
            data, peer = s.recvfrom(512)
        return data.decode(errors="replace").strip(), sockaddr_text(peer)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--v6only", action="store_true", help="set IPV6_V6ONLY=1")
    p.add_argument("mode", choices=["tcp", "udp", "udp-connected"])
    p.add_argument("addr", help="an IPv6 literal: ::1, ::ffff:127.0.0.1")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    a = p.parse_args()
    addr = a.addr.strip("[]")
    try:
        socket.inet_pton(socket.AF_INET6, addr)
    except OSError:
        p.error(f"{a.addr!r} is not an IPv6 address (write IPv4 as ::ffff:a.b.c.d)")
    for _ in range(a.count):
        at_ms = time.time_ns() // 1_000_000
        t = time.monotonic_ns()
        o = {"backend": None, "peer": None, "errno": None}
        try:
            if a.mode == "tcp":
                o["backend"], o["peer"] = tcp(addr, a.port, a.v6only)
            else:
                o["backend"], o["peer"] = udp(addr, a.port, a.v6only, a.mode == "udp-connected")
        except OSError as e:
            # socket.timeout (TimeoutError) has no errno: our own timeout.
            o["errno"] = e.errno if e.errno is not None else (
                errno.ETIMEDOUT if isinstance(e, TimeoutError) else None)
            o["error"] = f"{type(e).__name__}: {e}"
        o["micros"] = (time.monotonic_ns() - t) // 1000
        o["at_ms"] = at_ms
        print(json.dumps(o), flush=True)


if __name__ == "__main__":
    sys.exit(main())
