"""eas_tools/bench/adversarial.py's raw attacker client: the request it encodes once is a well-formed HTTP
request, and its loop counts statuses, keeps a kept-alive connection and reconnects when the server closes
(against a loopback stand-in server that records what arrives)."""

from __future__ import annotations

import asyncio

import pytest

from eas_tools.bench.adversarial import ATTACKER_ADDRESS, HOST, Tally, _loop_posts, multipart, normal_png, request_bytes

pytestmark = pytest.mark.anyio


def test_request_bytes_is_a_complete_multipart_request() -> None:
    png = normal_png()
    raw = request_bytes("/v1/answer", **multipart(png, "what?"))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "POST /v1/answer HTTP/1.1"
    fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert int(fields["content-length"]) == len(body)
    assert fields["content-type"].startswith("multipart/form-data; boundary=")
    assert png in body and b'name="question"' in body


async def test_loop_counts_statuses_and_reconnects_when_closed() -> None:
    peers: list[str] = []
    requests = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        peers.append(writer.get_extra_info("peername")[0])
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                requests += 1
                close = requests % 2 == 0  # every other answer closes the connection
                status = b"429 Too Many Requests" if close else b"422 Unprocessable Entity"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n"
                             + (b"connection: close\r\n" if close else b"") + b"\r\n{}")
                await writer.drain()
                if close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    tally, stop = Tally(), asyncio.Event()
    task = asyncio.create_task(_loop_posts(f"http://{HOST}:{port}", tally, stop, "/v1/answer",
                                           **multipart(normal_png(), "what?")))
    while sum(tally.statuses.values()) < 6:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    server.close()
    await server.wait_closed()
    assert tally.statuses[422] >= 3 and tally.statuses[429] >= 3
    assert len(peers) >= 3  # a new connection after each close, and only then
    assert len(peers) <= tally.statuses[429] + 1
    assert set(peers) == {ATTACKER_ADDRESS}
