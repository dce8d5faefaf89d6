"""The test proxy that plays a dead S3 endpoint must cut the connections in flight and take no new ones:
otherwise a "dead" endpoint keeps answering, or leaves a client waiting on a request for its read timeout."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.tcpproxy import TcpProxy


@pytest.fixture()
def silent_server():
    """(port, the connections it accepted): a server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], held
    server.close()
    for conn, _ in held:
        conn.close()


def test_stop_resets_a_request_in_flight_and_refuses_new_connections(silent_server):
    proxy = TcpProxy(target_port=silent_server[0]).start()
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    time.sleep(0.2)  # the request is through the proxy; its answer never comes
    proxy.stop()
    with pytest.raises(ConnectionResetError):
        client.recv(10)  # at once, not after the 5 s timeout
    client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def test_the_proxy_forwards_again_after_a_restart_on_the_same_port(silent_server):
    target, held = silent_server
    proxy = TcpProxy(target_port=target).start()
    port = proxy.port
    proxy.stop()
    proxy.start()
    try:
        assert proxy.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"x")
            deadline = time.monotonic() + 5
            while not held and time.monotonic() < deadline:
                time.sleep(0.01)
            (conn, _), = held  # the one connection, made after the restart, reached the server
            conn.settimeout(5)
            assert conn.recv(1) == b"x"
    finally:
        proxy.stop()
