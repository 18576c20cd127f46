"""One attacker beside normal clients, kind by kind (issue 17; the table is in docs/hardening.md).

    python -m eas_tools.bench.adversarial --seconds 10 --json-out runs/adversarial.json

A server (`serve` below: create_app + the connection limits of service/server.py, default Settings) runs
in its own process on 127.0.0.1, serving a tiny LLaVA (eas.zoo.llava, seeded) as `baseline`. Each attacker
runs in a process of its own (`--attack`) and connects from 127.0.0.2, as from another machine (the
server's per-address error budget, service/penalties.py, applies to it), sending each request's bytes,
encoded once, over raw connections (so that its own CPU stays small on a machine it shares with the
server); this process drives the rest:
8 normal clients in a closed loop (`POST /v1/answer`, a small PNG and a short question; each attacker's
window follows a no-attacker window of the same length, its baseline), and a
`/health/live` probe every 50 ms runs in a process of its own (`--probe`), first with no attacker, then
beside one attacker of each kind for `--seconds` each:

- long_token: a 1,000-emoji question (under the character limit, ~4,000 byte-level tokens);
- png_chunk_bomb: a ~12 MB PNG of 1,000,000 empty chunks;
- huge_chat_body: a 14 MB chat body of 400,000 messages;
- huge_header: one connection streaming a header of up to 128 MiB;
- slow_connections: 300 connections trickling their headers a byte at a time;
- max_size_images: an 8192x1 PNG, in a loop;
- overload_4096: 64 clients sending 4096x4096 RGBA PNGs.

Per kind: normal answers/s (and as a share of the no-attacker figure), /health/live p50/p99, 5xx
responses (anyone's), and the server's RSS before and 3 s after. Everything is bounded (time, sizes,
connections) and loopback only. It measures; the issue's targets are printed beside the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image, ImageDraw

from eas_tools.bench.processes import cpu_seconds, process_tree, tree_rss

HOST = "127.0.0.1"
# Attackers connect from another loopback address, as they would from another machine: the server's
# per-address error budget (service/penalties.py) then tells them from the normal clients (127.0.0.1).
ATTACKER_ADDRESS = "127.0.0.2"
NORMAL_CLIENTS = 8
PROBE_INTERVAL_S = 0.05
QUESTION = "what colour is the shape?"
KINDS = ("none", "long_token", "png_chunk_bomb", "huge_chat_body", "huge_header", "slow_connections",
         "max_size_images", "overload_4096")


# --- payloads --------------------------------------------------------------------------------------------

def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def normal_png() -> bytes:
    image = Image.new("RGB", (48, 40), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((10, 8, 38, 32), fill=(200, 30, 30))
    return _png(image)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def chunk_bomb(chunks: int = 1_000_000) -> bytes:
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    pixels = _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + b"\x80" * 24 for _ in range(8))))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"zzZz", b"") * chunks + pixels + _chunk(b"IEND", b"")


def multipart(image: bytes, question: str) -> dict[str, Any]:
    return {"files": {"image": ("i.png", image, "image/png")}, "data": {"question": question}}


# --- the server ------------------------------------------------------------------------------------------

def serve(model_dir: Path, port: int) -> None:
    """The server process: default Settings but the model path (so the model runs in a process of its own:
    service/runner/process.py); the connection limits of uvicorn_config."""
    from service.app import create_app
    from service.server import DrainingServer, uvicorn_config
    from service.settings import Settings

    settings = Settings(model_path=model_dir, model="tiny", device="cpu", dtype="fp32", api_token=None,
                        admin_token=None)
    app = create_app(settings)
    config = uvicorn_config(app, settings, host=HOST, port=port, log_level="warning", lifespan="on")
    DrainingServer(config, app.state.service).run()


def build_model(directory: Path) -> Path:
    from eas.zoo.llava import build_llava

    model, processor = build_llava(seed=0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- measuring -------------------------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.normal_ok = 0
        self.statuses: dict[int, int] = {}
        self.probe_ms: list[float] = []
        self.errors = 0

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


async def normal_client(url: str, tally: Tally, stop: asyncio.Event) -> None:
    image = normal_png()
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60) as client:
        while not stop.is_set():
            try:
                response = await client.post("/v1/answer", **multipart(image, QUESTION))
            except httpx.HTTPError:
                tally.errors += 1
                continue
            tally.count(response.status_code)
            if response.status_code == 200:
                tally.normal_ok += 1


def probe_for(url: str, seconds: float) -> dict[str, Any]:
    """The probe process: `/health/live` every PROBE_INTERVAL_S on one kept-alive connection, timed from the
    request's first byte to the response's last. Its own process, so the 8 normal clients' response handling
    on the bench's event loop never sits between the server's answer and the probe's clock."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        try:
            connection.request("GET", "/health/live")
            response = connection.getresponse()
            response.read()
            statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
        except (OSError, http.client.HTTPException):
            errors += 1
            connection.close()
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
        latencies.append((time.perf_counter() - t0) * 1000)
        time.sleep(PROBE_INTERVAL_S)
    return {"latencies_ms": latencies, "statuses": statuses, "errors": errors}


def request_bytes(path: str, **request: Any) -> bytes:
    """One HTTP/1.1 request, encoded once (httpx builds the multipart or JSON body and its headers): the
    attacker then sends the same bytes in a loop instead of encoding the request again each time."""
    built = httpx.Request("POST", f"http://{HOST}{path}", **request)
    body = built.read()
    headers = "".join(f"{name}: {value}\r\n" for name, value in built.headers.items())
    return f"POST {path} HTTP/1.1\r\n{headers}\r\n".encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status and whether the server closes the connection; the body is read and dropped."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    await reader.readexactly(int(fields.get("content-length", "0").strip()))
    return status, fields.get("connection", "").strip() == "close"


async def _loop_posts(url: str, tally: Tally, stop: asyncio.Event, path: str, **request: Any) -> None:
    """Send one request over and over on a raw connection from the attacker's address, reconnecting when
    the server closes it. Raw sockets, not httpx: the attacker shares this machine's two cores with the
    server, and httpx spent ~11 ms of CPU per request here (64 clients, 4096² PNGs: 0.4-0.5 of a core),
    load a remote attacker would not put on the server's machine."""
    payload = request_bytes(path, **request)
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while not stop.is_set():
        try:
            if writer is None:
                reader, writer = await _raw(url)
            assert reader is not None
            writer.write(payload)
            await writer.drain()
            status, close = await _read_response(reader)
            tally.count(status)
            if close:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.05)  # refused or closed by the server: try again, as an attacker would
    if writer is not None:
        writer.close()


async def _raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(url.rsplit(":", 1)[1])
    return await asyncio.open_connection(HOST, port, local_addr=(ATTACKER_ADDRESS, 0))


async def huge_header(url: str, tally: Tally, stop: asyncio.Event) -> None:
    chunk = b"a" * 65536
    while not stop.is_set():
        reader, writer = await _raw(url)
        try:
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(2048):  # up to 128 MiB
                if stop.is_set() or writer.is_closing():
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                status = await asyncio.wait_for(reader.read(32), 1)
                if status.startswith(b"HTTP/1.1 "):
                    tally.count(int(status[9:12]))
            writer.close()


async def slow_connections(url: str, tally: Tally, stop: asyncio.Event, count: int = 300) -> None:
    async def one() -> None:
        while not stop.is_set():
            try:
                _, writer = await _raw(url)
                for byte in b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 10_000:
                    if stop.is_set():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1.0)
                writer.close()
            except (ConnectionError, OSError):
                await asyncio.sleep(0.5)

    await asyncio.gather(*(one() for _ in range(count)))


def attacker(kind: str) -> Callable[[str, Tally, asyncio.Event], Awaitable[None]] | None:
    if kind == "none":
        return None
    if kind == "long_token":
        return lambda u, t, s: _loop_posts(u, t, s, "/v1/answer", **multipart(normal_png(), "\U0001f600" * 1000))
    if kind == "png_chunk_bomb":
        bomb = chunk_bomb()
        return lambda u, t, s: _loop_posts(u, t, s, "/v1/answer", **multipart(bomb, QUESTION))
    if kind == "huge_chat_body":
        body = json.dumps({"model": "baseline", "messages": [{"role": "user", "content": "hi"}] * 400_000}).encode()
        return lambda u, t, s: _loop_posts(u, t, s, "/v1/chat/completions", content=body,
                                           headers={"Content-Type": "application/json"})
    if kind == "huge_header":
        return huge_header
    if kind == "slow_connections":
        return slow_connections
    if kind == "max_size_images":
        long_png = _png(Image.new("RGB", (8192, 1), (10, 200, 30)))
        return lambda u, t, s: _loop_posts(u, t, s, "/v1/answer", **multipart(long_png, QUESTION))
    if kind == "overload_4096":
        big = _png(Image.new("RGBA", (4096, 4096), (10, 200, 30, 255)))

        async def overload(u: str, t: Tally, s: asyncio.Event) -> None:
            await asyncio.gather(*(_loop_posts(u, t, s, "/v1/answer", **multipart(big, QUESTION)) for _ in range(64)))
        return overload
    raise ValueError(f"unknown kind {kind!r}")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def attack_for(url: str, kind: str, seconds: float) -> dict[int, int]:
    """The attacker process: one kind for `seconds`, then the statuses it got."""
    tally, stop = Tally(), asyncio.Event()
    attack = attacker(kind)
    assert attack is not None
    task = asyncio.create_task(attack(url, tally, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait([task], timeout=30)
    task.cancel()
    return tally.statuses


async def run_kind(url: str, kind: str, seconds: float, server: psutil.Process) -> dict[str, Any]:
    rss_before = tree_rss(server)
    server_tree = process_tree(server)
    me = psutil.Process()
    tally, stop = Tally(), asyncio.Event()
    # The attacker runs in its own process, so its client-side work never delays this process's probe.
    attack = None if kind == "none" else await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eas_tools.bench.adversarial", "--attack", kind, "--url", url,
        "--seconds", str(seconds), stdout=asyncio.subprocess.PIPE)
    if attack is not None:
        await asyncio.sleep(0.5)  # its payload is built before it starts sending
    cpu0 = [cpu_seconds(server_tree), cpu_seconds([me])]
    attacker_cpu = 0.0
    prober = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eas_tools.bench.adversarial", "--probe", "--url", url, "--seconds", str(seconds),
        stdout=asyncio.subprocess.PIPE)
    tasks = [asyncio.create_task(normal_client(url, tally, stop)) for _ in range(NORMAL_CLIENTS)]
    peak = rss_before
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        await asyncio.sleep(0.1)
        peak = max(peak, tree_rss(server))
    cpu1 = [cpu_seconds(server_tree), cpu_seconds([me])]
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    for task in tasks:
        task.cancel()
    probed = json.loads((await prober.communicate())[0].decode().strip().splitlines()[-1])
    tally.probe_ms = probed["latencies_ms"]
    tally.errors += probed["errors"]
    for status, count in probed["statuses"].items():
        tally.statuses[int(status)] = tally.statuses.get(int(status), 0) + count
    if attack is not None:
        out, _ = await attack.communicate()
        report = json.loads(out.decode().strip().splitlines()[-1])
        for status, count in report["statuses"].items():
            tally.statuses[int(status)] = tally.statuses.get(int(status), 0) + count
        attacker_cpu = report["cpu_s"] / seconds  # its own CPU time, building its payload included
    await asyncio.sleep(3.0)  # settle before reading memory again
    rss_after = tree_rss(server)
    return {"kind": kind, "seconds": seconds, "normal_per_s": tally.normal_ok / seconds,
            "live_p50_ms": _percentile(tally.probe_ms, 0.5), "live_p99_ms": _percentile(tally.probe_ms, 0.99),
            "responses_5xx": tally.server_errors, "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
            "transport_errors": tally.errors, "rss_before_mib": rss_before / 2**20, "rss_peak_mib": peak / 2**20,
            "rss_after_mib": rss_after / 2**20,
            # Shares of one core while it ran: the server (all its processes), the attacker's process, and this
            # process (normal clients and probe). Two cores in all on the development machine.
            "cpu_server": (cpu1[0] - cpu0[0]) / elapsed, "cpu_attacker": attacker_cpu,
            "cpu_clients": (cpu1[1] - cpu0[1]) / elapsed}


def table(rows: list[dict[str, Any]]) -> str:
    """`vs none`: against the no-attacker window run just before the kind (the first row's for itself)."""
    first = rows[0]["normal_per_s"] or float("nan")
    lines = ["| attacker | normal answers/s | none just before | vs none | /health/live p50 / p99 ms | 5xx "
             "| RSS before → after MiB | CPU server / attacker / clients |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = r.get("paired_none_per_s") or first
        lines.append(f"| {r['kind']} | {r['normal_per_s']:.1f} | {base:.1f} | {r['normal_per_s'] / base:.0%} | "
                     f"{r['live_p50_ms']:.1f} / {r['live_p99_ms']:.1f} | {r['responses_5xx']} | "
                     f"{r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f} | "
                     f"{r['cpu_server']:.2f} / {r['cpu_attacker']:.2f} / {r['cpu_clients']:.2f} |")
    return "\n".join(lines)


async def drive(url: str, kinds: list[str], seconds: float, server: psutil.Process) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=2) as client:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/health/ready")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            await asyncio.sleep(0.2)
    rows = []
    for kind in kinds:
        paired = None
        if kind != "none":
            # A no-attacker window right before each kind: the ratio compares neighbours in time, so load that
            # comes and goes on a shared machine (and the server's state after the kinds before) lands on both.
            paired = await run_kind(url, "none", seconds, server)
        row = await run_kind(url, kind, seconds, server)
        if paired is not None:
            row["paired_none_per_s"] = paired["normal_per_s"]
            row["paired_none_live_p99_ms"] = paired["live_p99_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per attacker kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma separated; 'none' should come first")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server process (internal)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--attack", choices=KINDS[1:], help=argparse.SUPPRESS)  # an attacker process (internal)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the probe process (internal)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_for(args.url, args.seconds)), flush=True)
        return 0
    if args.serve is not None:
        serve(args.serve, args.port)
        return 0
    if args.attack is not None:
        if not args.url.startswith(f"http://{HOST}:"):
            parser.error("attacks go to loopback only")
        statuses = asyncio.run(attack_for(args.url, args.attack, args.seconds))
        print(json.dumps({"statuses": {str(k): v for k, v in statuses.items()}, "cpu_s": time.process_time()}),
              flush=True)
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kind(s) {unknown}; known: {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory(prefix="eas-adversarial-") as tmp:
        model_dir = build_model(Path(tmp) / "tiny")
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        process = subprocess.Popen([sys.executable, "-m", "eas_tools.bench.adversarial", "--serve", str(model_dir),
                                    "--port", str(port)], env=env)
        try:
            rows = asyncio.run(drive(f"http://{HOST}:{port}", kinds, args.seconds, psutil.Process(process.pid)))
        finally:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
            if process.poll() is None:
                process.kill()
    print(table(rows))
    print(f"load average: {os.getloadavg()}")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"rows": rows, "loadavg": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
