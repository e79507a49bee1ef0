"""Padded DATA must not shrink the windows of a consumer that acks what it is given."""

import asyncio

import h2.config
import h2.connection

from nodeagent.hbone.aio import HboneConnection, TunnelStream

RFC_DEFAULT_WINDOW = 65_535


class RecordingTransport:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data) -> None:
        self.out += data

    def writelines(self, chunks) -> None:
        for c in chunks:
            self.out += c

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name, default=None):
        return default

    def close(self) -> None:
        pass


def feed(conn: HboneConnection, data: bytes) -> None:
    while data:
        buf = conn.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]


async def test_padding_of_manually_acked_data_is_returned_to_the_window() -> None:
    received: list[bytes] = []
    streams: list[TunnelStream] = []

    def on_request(stream: TunnelStream) -> None:
        stream.respond(200)
        stream.manual_ack = True

        def take(data: memoryview) -> None:
            received.append(bytes(data))
            stream.ack(len(data))  # what a relay does: credit what it consumed

        stream.on_data = take
        streams.append(stream)

    server = HboneConnection(client_side=False, on_request=on_request)
    server.connection_made(RecordingTransport())  # type: ignore[arg-type]
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.5:80")])
    for _ in range(20):
        client.send_data(1, b"x" * 100, pad_length=200)  # 301 flow-controlled bytes each
    feed(server, client.data_to_send())
    await asyncio.sleep(0)

    assert b"".join(received) == b"x" * 2000
    sid = streams[0].stream_id
    stream_state = server.conn._streams[sid]
    # Every flow-controlled byte (payload, padding and pad-length octet) came back. The
    # client never acknowledged our SETTINGS here, so the RFC's default window applies.
    assert stream_state.inbound_window + stream_state.unacked == RFC_DEFAULT_WINDOW
    server.conn.close()
