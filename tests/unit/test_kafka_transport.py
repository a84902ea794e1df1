"""kafka-python's transport hands over what the broker said before it closed the connection.

A broker that refuses SASL credentials sends the reason and closes the connection 100 ms later
(`connection.failed.authentication.delay.ms`). On a loaded machine the client reads both at once;
kafka-python 3.0.12 then dropped the reason and reported "socket disconnected", and the worker
retried a wrong password as an unreachable broker (`ner_stream.kafka_io._deliver_before_close`).
"""

from __future__ import annotations

import socket

import pytest
from kafka import errors as kafka_errors
from kafka.net.transport import KafkaSSLTransport, KafkaTCPTransport

import ner_stream.kafka_io  # noqa: F401  (mends the transports on import)


class Net:
    """The parts of kafka-python's event loop a transport's read loop and close use."""

    async def wait_read(self, sock):
        return None

    def unregister_event(self, sock, events):
        pass

    def cancel(self, task):
        pass


class Protocol:
    _sensors = None

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[BaseException | None] = []

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def connection_lost(self, error: BaseException | None) -> None:
        self.lost.append(error)


def read_until_closed(transport: KafkaTCPTransport) -> None:
    """Run the transport's read loop (a coroutine of kafka-python's own loop) to its end."""
    transport._read = True
    coroutine = transport._read_from_sock()
    with pytest.raises(StopIteration):
        for _ in range(10):
            coroutine.send(None)


def test_bytes_read_together_with_the_close_reach_the_protocol_before_the_error():
    client, broker = socket.socketpair()
    client.setblocking(False)
    broker.sendall(b"the broker's answer")
    broker.close()  # answer and close are both waiting when the client first reads
    transport = KafkaTCPTransport(Net(), client)
    protocol = Protocol()
    transport.set_protocol(protocol)

    read_until_closed(transport)

    assert b"".join(protocol.received) == b"the broker's answer"
    [error] = protocol.lost
    assert isinstance(error, kafka_errors.KafkaConnectionError)
    assert transport.is_closing()


def test_a_close_with_nothing_before_it_is_still_an_error_at_once():
    client, broker = socket.socketpair()
    client.setblocking(False)
    broker.close()
    transport = KafkaTCPTransport(Net(), client)
    protocol = Protocol()
    transport.set_protocol(protocol)

    read_until_closed(transport)

    assert protocol.received == []
    [error] = protocol.lost
    assert isinstance(error, kafka_errors.KafkaConnectionError)


def test_the_tls_transport_is_mended_too():
    # Its own _sock_recv (SSL reads) has the same shape; the TLS read itself needs a TLS peer,
    # which the secure broker's integration tests give.
    assert getattr(KafkaSSLTransport._sock_recv, "delivers_before_close", False)
    assert KafkaSSLTransport._sock_recv is not KafkaTCPTransport._sock_recv
