"""A minimal app plugin for end-to-end tests of the core: JSON lines over TCP.

Each line a client sends is one message into the bus (or an ``ERROR`` line
back); every message the bus delivers is written to all clients as one line.
It is installed into test processes through a generated entry point (see
``install_lineapp``), so real ``threatbus`` processes load it like any plugin.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
from pathlib import Path
from typing import Any

import threatbus
from threatbus.config import port
from threatbus.data import decode
from threatbus.errors import DecodeError
from threatbus.stix import validate
from threatbus.testing import install_test_plugin
from threatbus.worker import StoppableWorker

logger = logging.getLogger(__name__)


class _Server(StoppableWorker):
    def __init__(self, listen_port: int, publish_queue: queue.Queue, deliveries: queue.Queue) -> None:
        super().__init__(name="lineapp")
        self.publish_queue = publish_queue
        self.deliveries = deliveries
        self.listener = socket.create_server(("127.0.0.1", listen_port))
        self.listener.setblocking(False)
        self.clients: dict[socket.socket, bytes] = {}
        self.rejected = 0

    def run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            while not self.stopping:
                for key, _ in selector.select(timeout=0.05):
                    if key.fileobj is self.listener:
                        client, _ = self.listener.accept()
                        self.clients[client] = b""
                        selector.register(client, selectors.EVENT_READ)
                    else:
                        self._read(key.fileobj, selector)
                for message in self.leftovers(self.deliveries):
                    for client in list(self.clients):
                        client.sendall(message.encode() + b"\n")
            for client in self.clients:
                client.close()
        self.listener.close()

    def _read(self, client: Any, selector: selectors.BaseSelector) -> None:
        data = client.recv(65536)
        if not data:
            selector.unregister(client)
            del self.clients[client]
            client.close()
            return
        *lines, rest = (self.clients[client] + data).split(b"\n")
        self.clients[client] = rest
        for line in lines:
            try:
                message = decode(line)
                validate(message)
            except DecodeError as err:
                self.rejected += 1
                logger.warning("rejected line: %s", err)
                client.sendall(f"ERROR {err}\n".encode())
                continue
            self.publish_queue.put(message)


class LineApp:
    def __init__(self) -> None:
        self.server: _Server | None = None
        self.deliveries: queue.Queue = queue.Queue()

    @threatbus.app
    def config_validators(self) -> list[Any]:
        return [port("plugins.apps.lineapp.port", required=True)]

    @threatbus.app
    def run(self, config: Any, publish_queue: queue.Queue, subscribe: Any) -> None:
        self.server = _Server(config.port, publish_queue, self.deliveries)
        subscribe("stix2", self.deliveries)
        self.server.start()
        logger.info("lineapp listening on 127.0.0.1:%s", config.port)

    @threatbus.app
    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server.join(5)


def install_lineapp(directory: Path) -> Path:
    """Make LineApp an installed plugin for processes with ``directory`` on PYTHONPATH."""
    source = Path(__file__).read_text()
    return install_test_plugin(directory, "threatbus.app", "lineapp", "threatbus_lineapp", source, "LineApp")
