"""A TCP proxy on 127.0.0.1 that a test can cut and restore: an S3 endpoint that goes away mid-run and
comes back with its data intact (the moto server behind it keeps running).

    proxy = TcpProxy(target_port=moto.port).start()    # listen on proxy.port
    proxy.stop()                                        # refuse new connections, reset the open ones
    proxy.start()                                       # the same port again
"""

from __future__ import annotations

import socket
import struct
import threading


class TcpProxy:
    def __init__(self, target_port: int, port: int = 0):
        self.target_port = target_port
        self.port = port
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                stopped = self._listener is not listener  # stop() ran while this connection was being set up
                if not stopped:
                    self._conns += [client, upstream]
            if stopped:
                for s in (client, upstream):
                    _reset(s)
                return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        """Stop listening and reset every open connection (RST, as a dead endpoint would).

        Closing a socket does not wake a thread blocked on it (the accept thread would go on accepting, a pipe
        thread in recv would keep its connection open, its client waiting for ever): shutdown() first."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # the blocked accept() returns: no connection is taken after this
            except OSError:
                pass
            listener.close()
        for s in conns:
            _reset(s)


def _reset(s: socket.socket) -> None:
    """Abort a connection: RST to its peer (linger 0), and any thread blocked in recv on it woken."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RD)  # wakes a recv; no packet is sent, the close below sends the RST
    except OSError:
        pass
    s.close()


class SilentEndpoint:
    """Accepts connections on 127.0.0.1 and never answers: a half-open endpoint, as a network partition leaves
    one (connections succeed, requests time out). `connections` counts what clients opened."""

    def __init__(self):
        self.connections = 0
        self._held: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            self.connections += 1
            self._held.append(client)

    def stop(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for s in self._held:
            _reset(s)
