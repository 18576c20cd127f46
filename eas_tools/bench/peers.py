"""eas-serve beside its peers on the same model: LitServe and a minimal FastAPI + transformers server.

    python -m eas_tools.bench.peers                       # embedded demo model, 1/4/16 clients, 3 rounds
    python -m eas_tools.bench.peers --cotenant            # eas-serve's thread choice beside a busy neighbour
    python -m eas_tools.bench.peers --cpu                 # one client: wall and server CPU per request
    python -m eas_tools.bench.peers --device cuda         # every server on the GPU, in bf16

Each server runs in its own process with the same torch thread count (`--threads`, default 1), loads the
same directory with `eas.model.loading.load_model` (eas-serve through its own loader, which ends there) and
answers the same JSON body `{"image": base64, "question": ..., "max_new_tokens": n}`:

- `eas-serve`: the service itself (`service.app.create_app` under uvicorn, only the `eas` variant).
- `litserve`: a `LitAPI` with dynamic batching (`--max-batch`, `--litserve-timeout-ms`), one worker.
- `naive`: FastAPI with one endpoint that runs `LoadedModel.answer` for one request at a time.

eas-serve generates with its own decode loop (eas/model/decoding.py: transformers' greedy loop, its
per-call set-up done once per model; exact); the peers with transformers' `model.generate`, as their users
write them (`--peer-loop eas` gives them eas-serve's loop, to tell the two effects apart). eas-serve also
keeps freed memory for reuse (service/allocator.py); `--peer-malloc-reuse` gives the peers the same glibc
thresholds through glibc's environment variables.

First every server answers the same request list one by one and the answers are compared (identity).
Then, per round, for each client count every server gets the same closed-loop load for `--duration`
seconds, cut into `--slices` turns that alternate between the servers (the first server rotates each
round), so load that comes and goes on a shared machine lands on all of them. The report gives
per-cell medians over rounds of req/s and p50 latency, and eas-serve's paired per-round ratios against
each peer (median of the ratios).

`--cotenant` starts a CPU-bound process pinned to one core and measures eas-serve four ways beside it:
its default threads (service/cpu.py: usable CPUs less one, OMP_WAIT_POLICY=PASSIVE), 1 thread, every CPU
with the passive policy, and 2 threads with the OpenMP wait policy left unset (the behaviour before issue
18); the ratio to 1 thread is the acceptance. `--no-neighbour` runs the same set-ups without the neighbour.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

EMBEDDED = Path(__file__).resolve().parents[2] / "model_store" / "embedded" / "easy-vqa-llava-eas"
SERVERS = ("eas-serve", "litserve", "naive")
ROUTES = {"eas-serve": "/v1/answer", "litserve": "/predict", "naive": "/answer"}
HEALTH = {"eas-serve": "/health/ready", "litserve": "/health", "naive": "/health"}
COLOURS = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (220, 200, 30), (120, 60, 160), (90, 90, 90),
           (0, 150, 150), (230, 120, 20)]
OLD_THREADS = "EAS_BENCH_SKIP_CPU_SETUP"  # the server skips service/cpu.py's set-up (the old behaviour)
TREE = "EAS_BENCH_TREE"  # eas-serve@tree=PATH: that server's working directory (another checkout's code)
SWITCH_INTERVAL = "EAS_BENCH_SWITCH_INTERVAL_MS"  # eas-serve@si=<ms>: sys.setswitchinterval in that server
PEER_LOOP = "EAS_BENCH_PEER_LOOP"  # the peers' decode loop (peer_decode_loop)
QUESTIONS = ["what colour is the shape?", "what shape is in the image?", "is there a circle?",
             "what is the colour of the shape?"]


# --- the requests ------------------------------------------------------------------------------------------

def request_bodies(count: int = 16, max_new_tokens: int = 8) -> list[dict[str, Any]]:
    """`count` distinct requests: shapes in several colours and sizes, several questions."""
    from PIL import Image, ImageDraw

    bodies = []
    for i in range(count):
        size = 48 + 8 * (i % 4)
        image = Image.new("RGB", (size, size), (255, 255, 255))
        box = (size // 5, size // 5, 4 * size // 5, 4 * size // 5)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=COLOURS[i % len(COLOURS)])
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        bodies.append({"image": base64.b64encode(buffer.getvalue()).decode(), "question": QUESTIONS[i % 4],
                       "max_new_tokens": max_new_tokens})
    return bodies


# --- the servers (each `python -m eas_tools.bench.peers _serve NAME ...` in its own process) -------------

def serve(name: str, port: int, model_dir: Path, *, max_batch: int, window_ms: float,
          litserve_timeout_ms: float, device: str = "cpu") -> None:
    """`device`: cpu (fp32) or cuda (bf16), the service's own defaults for each (`EAS_DTYPE=auto`)."""
    if name == "eas-serve":
        _serve_eas(port, model_dir, max_batch, window_ms, device)
    elif name == "litserve":
        _serve_litserve(port, model_dir, max_batch, litserve_timeout_ms, device)
    else:
        _serve_naive(port, model_dir, device)


def _serve_eas(port: int, model_dir: Path, max_batch: int, window_ms: float, device: str = "cpu") -> None:
    if os.environ.get(SWITCH_INTERVAL):
        sys.setswitchinterval(float(os.environ[SWITCH_INTERVAL]) / 1000.0)
    if not os.environ.get(OLD_THREADS):
        from service.cpu import prepare_process

        prepare_process()  # what `eas serve` does: OMP_NUM_THREADS / OMP_WAIT_POLICY unless already set

    from service.app import create_app
    from service.server import DrainingServer, uvicorn_config
    from service.settings import Settings

    settings = Settings(model_path=model_dir, load_baseline=False, model="peers", device=device, dtype="auto",
                        max_batch_size=max_batch, max_batch_wait_ms=window_ms, max_queue_size=1024,
                        default_deadline_ms=600_000, max_deadline_ms=600_000, api_token=None, admin_token=None,
                        shadow_fraction=0.0)
    app = create_app(settings)
    # The served configuration (service/server.py: the guarded protocol, connection limits), as `eas serve`
    config = uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            access_log=False)
    DrainingServer(config, app.state.service).run()


def peer_decode_loop() -> str:
    """The peers' generation loop: transformers' own `model.generate`, as a LitServe or FastAPI +
    transformers user writes it; `--peer-loop eas` gives them eas-serve's (eas/model/decoding.py) instead,
    to tell the loop's share of a difference from the serving layer's."""
    return os.environ.get(PEER_LOOP, "transformers")


def decode_body(body: dict[str, Any]) -> tuple[Any, str, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")
    return image, str(body["question"]), int(body.get("max_new_tokens", 8))


def _serve_litserve(port: int, model_dir: Path, max_batch: int, timeout_ms: float, device: str = "cpu") -> None:
    import litserve as ls

    from eas_tools.bench.litserve_api import PeerApi

    api = PeerApi(model_dir, max_batch_size=max_batch, batch_timeout=timeout_ms / 1000.0)
    server = ls.LitServer(api, accelerator="cuda" if device == "cuda" else "cpu", devices=1, workers_per_device=1,
                          timeout=600)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False, num_api_servers=1)


def _serve_naive(port: int, model_dir: Path, device: str = "cpu") -> None:
    import threading

    import uvicorn
    from fastapi import FastAPI

    from eas.model.loading import load_model

    model = load_model(model_dir, device=device, dtype="auto")
    model.decode_loop = peer_decode_loop()
    lock = threading.Lock()  # one request at a time: no batching, no concurrent use of the model
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/answer")
    def answer(body: dict[str, Any]) -> dict[str, str]:
        image, question, max_new_tokens = decode_body(body)
        with lock:
            return {"answer": model.answer([image], [question], max_new_tokens)[0]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    label: str
    url: str
    process: subprocess.Popen[bytes]


@contextmanager
def start_server(name: str, args: argparse.Namespace, label: str | None = None,
                 env: dict[str, str] | None = None):
    port = free_port()
    command = [sys.executable, "-m", "eas_tools.bench.peers", "_serve", name, "--port", str(port),
               "--model", str(args.model), "--max-batch", str(args.max_batch), "--window-ms", str(args.window_ms),
               "--litserve-timeout-ms", str(args.litserve_timeout_ms), "--device", args.device]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env if env is not None else thread_env(args.threads))}
    environment = {k: v for k, v in environment.items() if v is not None}
    # eas-serve@tree=PATH: the server runs from that checkout (`python -m` puts its working directory first)
    tree = environment.pop(TREE, None)
    process = subprocess.Popen(command, env=environment, start_new_session=True, cwd=tree)
    server = Server(name, label or name, f"http://127.0.0.1:{port}", process)
    try:
        _wait_ready(server, HEALTH[name])
        yield server
    finally:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)  # litserve's workers share the server's session
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def _variant(spec: str, args: argparse.Namespace) -> tuple[str, argparse.Namespace, str, dict[str, str]]:
    """`eas-serve@si=0.5`: eas-serve with the interpreter's GIL switch interval at 0.5 ms;
    `eas-serve@env=EAS_X=v`: with that environment variable; `eas-serve@tree=PATH`: the code of another
    checkout, a `git worktree` of an earlier commit, say (experiment knobs; the label keeps the spec so
    several can run side by side)."""
    name, _, extra = spec.partition("@")
    env = thread_env(args.threads)
    if extra.startswith("si="):
        env[SWITCH_INTERVAL] = extra.removeprefix("si=")
    elif extra.startswith("env="):  # eas-serve@env=NAME=VALUE (VALUE defaults to 1): any setting, A/B
        key, _, value = extra.removeprefix("env=").partition("=")
        env[key] = value or "1"
    elif extra.startswith("tree="):
        env[TREE] = str(Path(extra.removeprefix("tree=")).resolve())
    if name != "eas-serve":
        env[PEER_LOOP] = getattr(args, "peer_loop", "transformers")
        if getattr(args, "peer_malloc_reuse", False):
            env.update(malloc_reuse_env())
    return name, args, spec, env


def malloc_reuse_env() -> dict[str, str]:
    """eas-serve's malloc thresholds (service/allocator.py) as the environment variables glibc reads at start."""
    from service.allocator import MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES

    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES)}


def thread_env(threads: int | None, policy: str | None = None) -> dict[str, str]:
    env: dict[str, str] = {}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def _wait_ready(server: Server, path: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=2) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.label} exited with {server.process.returncode} before it was ready")
            try:
                if client.get(server.url + path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{server.label} was not ready within {timeout_s:.0f} s")


# --- the load ----------------------------------------------------------------------------------------------

@dataclass
class Cell:
    server: str
    clients: int
    round: int
    requests: int
    wall_s: float
    p50_ms: float
    p90_ms: float
    errors: int
    # mean rows per model call: eas-serve's batch-size metric, LitServe's per-answer report, 1 for naive
    mean_batch: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0


async def closed_loop(url: str, bodies: list[dict[str, Any]], clients: int, duration_s: float,
                      warmup_s: float, batches: list[int] | None = None) -> tuple[list[float], int, float]:
    """`clients` clients, each sending its next request as soon as its last one is answered. A server that
    reports each answer's batch size (LitServe here) has them appended to `batches`."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(trust_env=False, timeout=120, limits=limits) as client:
        start = time.monotonic()
        measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

        async def one(k: int) -> None:
            nonlocal errors
            i = k
            while True:
                sent = time.monotonic()
                if sent >= stop_at:
                    return
                response = await client.post(url, json=bodies[i % len(bodies)])
                done = time.monotonic()
                i += clients
                if measure_from <= done <= stop_at:  # answered inside the window (req/s = these / window)
                    if response.status_code == 200:
                        latencies.append(done - sent)
                        if batches is not None and "batch" in (body := response.json()):
                            batches.append(int(body["batch"]))
                    else:
                        errors += 1

        await asyncio.gather(*(one(k) for k in range(clients)))
    return latencies, errors, duration_s


def measure_cell(servers: list[Server], bodies: list[dict[str, Any]], clients: int, rnd: int, duration_s: float,
                 warmup_s: float, slices: int) -> list[Cell]:
    """One (round, clients) cell for every server: `slices` turns each, the servers alternating, so load
    that comes and goes on a shared machine lands on all of them alike."""
    latencies: dict[str, list[float]] = {s.label: [] for s in servers}
    errors = dict.fromkeys(latencies, 0)
    reported: dict[str, list[int]] = {s.label: [] for s in servers}  # per answer (LitServe)
    counted = {s.label: [0.0, 0.0] for s in servers}  # (rows, batches) from eas-serve's metrics
    shift = rnd % len(servers)
    order = servers[shift:] + servers[:shift]  # who goes first rotates every round
    for k in range(slices):
        for server in order if k % 2 == 0 else list(reversed(order)):
            before = batch_counts(server)
            got, failed, _ = asyncio.run(closed_loop(server.url + ROUTES[server.name], bodies, clients,
                                                     duration_s / slices, warmup_s, reported[server.label]))
            after = batch_counts(server)
            if before is not None and after is not None:
                counted[server.label][0] += after[0] - before[0]
                counted[server.label][1] += after[1] - before[1]
            latencies[server.label] += got
            errors[server.label] += failed
    cells = []
    for server in servers:
        ordered = sorted(latencies[server.label]) or [float("nan")]
        rows, calls = counted[server.label]
        mean_batch = (rows / calls if calls else rows_per_call(reported[server.label]) if reported[server.label]
                      else 1.0 if server.name == "naive" else None)
        cells.append(Cell(server=server.label, clients=clients, round=rnd, requests=len(latencies[server.label]),
                          wall_s=duration_s, p50_ms=1000 * statistics.median(ordered),
                          p90_ms=1000 * ordered[int(0.9 * (len(ordered) - 1))], errors=errors[server.label],
                          mean_batch=mean_batch))
    return cells


def rows_per_call(reports: list[int]) -> float:
    """Mean rows per model call from each answer's batch size: a call of n rows reports n answers of n, so
    the calls number sum(1/n) over the answers (the harmonic mean of the reports)."""
    return len(reports) / sum(1 / n for n in reports)


def batch_counts(server: Server) -> tuple[float, float] | None:
    """eas-serve's (rows, batches) so far, summed over its variants, from /metrics; None for other servers."""
    if server.name != "eas-serve":
        return None
    return batch_totals(httpx.get(server.url + "/metrics", trust_env=False, timeout=10).text)


def batch_totals(text: str) -> tuple[float, float]:
    """(rows, batches) from the `eas_batch_size` histogram's sum and count in a Prometheus exposition."""
    total = {"eas_batch_size_sum": 0.0, "eas_batch_size_count": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in total:
            total[name] += float(line.rsplit(" ", 1)[1])
    return total["eas_batch_size_sum"], total["eas_batch_size_count"]


def answers(server: Server, bodies: list[dict[str, Any]]) -> list[str]:
    with httpx.Client(trust_env=False, timeout=120) as client:
        out = []
        for body in bodies:
            response = client.post(server.url + ROUTES[server.name], json=body)
            response.raise_for_status()
            out.append(response.json()["answer"])
        return out


# --- the report --------------------------------------------------------------------------------------------

@dataclass
class Report:
    settings: dict[str, Any]
    load_before: str
    load_after: str = ""
    identical_answers: bool | None = None
    answers: dict[str, list[str]] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)


def summarise(cells: list[Cell], reference: str, others: list[str]) -> list[dict[str, Any]]:
    """Per (server, clients): medians over rounds; for the reference, its paired per-round ratios to others."""
    rows = []
    by = {(c.server, c.clients, c.round): c for c in cells}
    for clients in sorted({c.clients for c in cells}):
        for name in [reference, *others]:
            mine = [c for c in cells if c.server == name and c.clients == clients]
            if not mine:
                continue
            row: dict[str, Any] = {"server": name, "clients": clients, "rounds": len(mine),
                                   "rps": statistics.median(c.rps for c in mine),
                                   "p50_ms": statistics.median(c.p50_ms for c in mine),
                                   "errors": sum(c.errors for c in mine)}
            batches = [c.mean_batch for c in mine if c.mean_batch is not None]
            if batches:
                row["mean_batch"] = statistics.median(batches)
            if name != reference:
                pairs = [(by[(reference, clients, c.round)], c) for c in mine if (reference, clients, c.round) in by]
                # > 1 means eas-serve (the reference) is better: more req/s, lower p50
                row[f"{reference}_rps_ratio"] = statistics.median(r.rps / c.rps for r, c in pairs if c.rps)
                row[f"{reference}_p50_ratio"] = statistics.median(r.p50_ms / c.p50_ms for r, c in pairs)
            rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]], reference: str) -> str:
    lines = [f"{'clients':>7} {'server':<22} {'req/s':>8} {'p50 ms':>8} {'batch':>6}  paired vs {reference} "
             f"(req/s ratio, p50 ratio; median of rounds)"]
    for row in rows:
        extra = ""
        if f"{reference}_rps_ratio" in row:
            extra = (f"  {reference}/this req/s {row[f'{reference}_rps_ratio']:.2f}x, "
                     f"p50 {row[f'{reference}_p50_ratio']:.2f}x")
        batch = f"{row['mean_batch']:>6.2f}" if "mean_batch" in row else f"{'–':>6}"
        lines.append(f"{row['clients']:>7} {row['server']:<22} {row['rps']:>8.1f} {row['p50_ms']:>8.1f} {batch}{extra}")
    return "\n".join(lines)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (cpus {os.cpu_count()})"


# --- the two benchmarks ------------------------------------------------------------------------------------

def interleaved_rounds(servers: list[Server], bodies: list[dict[str, Any]], args: argparse.Namespace) -> list[Cell]:
    """Every round, every client count: each server's cell, measured in alternating slices."""
    cells: list[Cell] = []
    for rnd in range(args.rounds):
        for clients in (int(c) for c in args.clients.split(",")):
            for cell in measure_cell(servers, bodies, clients, rnd, args.duration, args.warmup, args.slices):
                cells.append(cell)
                batch = "" if cell.mean_batch is None else f" batch {cell.mean_batch:5.2f}"
                print(f"round {rnd} clients {clients:>2} {cell.server:<24} {cell.rps:7.1f} req/s "
                      f"p50 {cell.p50_ms:6.1f} ms{batch}", file=sys.stderr, flush=True)
    return cells


def finish(report: Report, cells: list[Cell], labels: list[str]) -> Report:
    """The report's cells and its paired summary against the first label."""
    report.load_after = _load()
    report.cells = [{**asdict(c), "rps": c.rps} for c in cells]
    report.summary = summarise(cells, labels[0], labels[1:])
    return report


def run_peers(args: argparse.Namespace) -> Report:
    bodies = request_bodies(args.requests, args.max_new_tokens)
    report = Report(settings={k: str(v) for k, v in vars(args).items()}, load_before=_load())
    with ExitStack() as stack:
        servers = [stack.enter_context(start_server(*_variant(name, args))) for name in args.servers.split(",")]
        for server in servers:
            report.answers[server.label] = answers(server, bodies)
        report.identical_answers = len({tuple(a) for a in report.answers.values()}) == 1
        cells = interleaved_rounds(servers, bodies, args)
    return finish(report, cells, [s.label for s in servers])


def run_cotenant(args: argparse.Namespace) -> Report:
    """eas-serve beside a CPU-bound neighbour pinned to one core, four thread set-ups, interleaved."""
    bodies = request_bodies(args.requests, args.max_new_tokens)
    report = Report(settings={k: str(v) for k, v in vars(args).items()}, load_before=_load())
    setups = {  # label -> the server's thread environment (None: nothing set, service/cpu.py decides)
        "default": {},
        "1-thread": thread_env(1),
        "all-cpus-passive": thread_env(len(os.sched_getaffinity(0)), "PASSIVE"),  # every CPU to torch, passive
        "2-threads-unset-policy": {**thread_env(2), OLD_THREADS: "1"},  # before issue 18: torch's own choice
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    with ExitStack() as stack:
        servers = []
        for label, env in setups.items():
            environment = {**base, **env}
            servers.append(stack.enter_context(start_server("eas-serve", args, label=label, env=environment)))
        if not args.no_neighbour:  # --no-neighbour: the same set-ups on the machine as it is
            neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                         preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
            stack.callback(neighbour.wait, 10)
            stack.callback(neighbour.kill)
            time.sleep(0.5)
        cells = interleaved_rounds(servers, bodies, args)
    return finish(report, cells, list(setups))


def run_cpu(args: argparse.Namespace) -> None:
    """One client, requests one by one: wall time and the server's CPU time per request (its threads and
    child processes, from psutil), each server in turn per round."""
    from eas_tools.bench.processes import cpu_seconds, process_tree

    def cpu_s(pid: int) -> float:
        return cpu_seconds(process_tree(pid))

    bodies = request_bodies(args.requests, args.max_new_tokens)
    print(f"load average before {_load()}")
    with ExitStack() as stack, httpx.Client(trust_env=False, timeout=120) as client:
        servers = [stack.enter_context(start_server(*_variant(name, args))) for name in args.servers.split(",")]
        for server in servers:
            for body in bodies[:5]:  # warm
                client.post(server.url + ROUTES[server.name], json=body)
        for rnd in range(args.rounds):
            for server in servers:
                cpu0, wall0 = cpu_s(server.process.pid), time.perf_counter()
                for i in range(40):
                    client.post(server.url + ROUTES[server.name], json=bodies[i % len(bodies)])
                wall, cpu = (time.perf_counter() - wall0) / 40, (cpu_s(server.process.pid) - cpu0) / 40
                print(f"round {rnd} {server.label:<24} wall/request {1000 * wall:6.1f} ms, server CPU/request "
                      f"{1000 * cpu:6.1f} ms")
    print(f"load average after {_load()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eas_tools.bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="bench", choices=["bench", "_serve"])
    parser.add_argument("name", nargs="?", choices=SERVERS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", type=Path, default=EMBEDDED)
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="eas-serve first: it is the reference; eas-serve@si=<ms> sets its GIL switch interval")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds before each slice")
    parser.add_argument("--slices", type=int, default=4, help="turns per server and cell, alternating")
    parser.add_argument("--requests", type=int, default=16, help="distinct requests, cycled")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every server (0: theirs)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=5.0, help="eas-serve's max batch wait")
    parser.add_argument("--litserve-timeout-ms", type=float, default=5.0, help="LitServe's batch_timeout")
    parser.add_argument("--peer-loop", choices=["transformers", "eas"], default="transformers",
                        help="the peers' decode loop: transformers' model.generate (what their users write), or "
                             "eas-serve's own (eas/model/decoding.py), to separate the loop from the serving layer")
    parser.add_argument("--peer-malloc-reuse", action="store_true",
                        help="give the peers eas-serve's malloc thresholds (service/allocator.py), to tell the "
                             "allocator apart from the serving layer")
    parser.add_argument("--cotenant", action="store_true", help="eas-serve's threads beside a busy neighbour")
    parser.add_argument("--no-neighbour", action="store_true",
                        help="with --cotenant: the same thread set-ups without the neighbour (the control)")
    parser.add_argument("--cpu", action="store_true", help="one client: wall and server CPU time per request")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where every server runs its model: cpu (fp32) or cuda (bf16)")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if args.command == "_serve":
        serve(args.name, args.port, args.model, max_batch=args.max_batch, window_ms=args.window_ms,
              litserve_timeout_ms=args.litserve_timeout_ms, device=args.device)
        return
    if args.cpu:
        run_cpu(args)
        return
    report = run_cotenant(args) if args.cotenant else run_peers(args)
    reference = "default" if args.cotenant else report.summary[0]["server"]
    print(format_summary(report.summary, reference))
    if report.identical_answers is not None:
        print(f"answers identical across servers: {report.identical_answers}")
    print(f"load average before {report.load_before}, after {report.load_after}")
    if args.out:
        args.out.write_text(json.dumps(asdict(report), indent=1))


if __name__ == "__main__":
    main()
