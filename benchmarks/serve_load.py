"""Load on ``lav2 serve``: requests/s and p50/p95 latency at 1, 4 and 16 concurrent clients, on 127.0.0.1.

The server runs as users start it (``lav2 serve`` in its own process, ``--threads`` torch threads);
each client is a thread that sends one request after another (a closed loop), every request a
greedy chat completion about an image with exactly ``--max-tokens`` new tokens allowed, so the
server may batch requests that wait together. A level's requests/s is its answered requests over
its wall time; latency is per request, as the client sees it. After each level the server's
``/health`` says how many batches it ran and the largest, which shows what batching did.

Without ``--model`` it serves the demo config's shape: the demo base trained for a few steps on
generated demo data (untimed), a CLIP tower from ``arch`` and a zero-init adapter. Bounded: each
level sends ``--requests-per-client`` per client (at least ``--min-requests`` per level).

    .venv/bin/python -m benchmarks.serve_load [--model DIR|models:/name@alias] [--levels 1,4,16]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is drawn in this picture?"


def demo_adapter(scratch: Path, base_steps: int) -> Path:
    """The demo config's model built into ``scratch``: a briefly trained demo base, a zero-init adapter."""
    from llama_adapter_v2.config import load_config
    from llama_adapter_v2.data.demo import generate_demo
    from llama_adapter_v2.infer.loading import inference_model
    from llama_adapter_v2.model.checkpoint import save_adapter
    from llama_adapter_v2.train.demo_base import train_demo_base

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"model.base.path={scratch / 'base'}", "model.vision.path=null",
        f"training.demo_base.steps={base_steps}",
    ])

    def moved(path: Path) -> Path:
        return scratch / Path(path).relative_to(REPO)

    for captions in cfg.data.captions:
        captions.annotations, captions.images = moved(captions.annotations), moved(captions.images)
    for instructions in cfg.data.instructions:
        instructions.path = moved(instructions.path)
        if instructions.image_root is not None:
            instructions.image_root = moved(instructions.image_root)
    if cfg.data.grounded is not None:
        cfg.data.grounded.questions = moved(cfg.data.grounded.questions)
        cfg.data.grounded.images = moved(cfg.data.grounded.images)
    generate_demo(cfg.data)
    train_demo_base(cfg)
    return save_adapter(inference_model(cfg, None), scratch / "adapter")


def image_url(size: int = 64) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(model: str, max_tokens: int) -> dict[str, Any]:
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": image_url()}}]
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0}


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..1) of at least one value."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(share * len(ordered)))) - 1]


def measure_level(url: str, body: dict[str, Any], *, clients: int, requests: int,
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``clients`` threads share ``requests`` requests, each thread one after another."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    left = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=600, headers=headers) as session:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                started = time.perf_counter()
                response = session.post(f"{url}/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        failures.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "clients": clients, "requests": requests, "answered": len(latencies), "failed": len(failures),
        "failures": failures[:3], "wall_s": wall, "requests_per_s": len(latencies) / wall,
        "p50_s": percentile(latencies, 0.5) if latencies else None,
        "p95_s": percentile(latencies, 0.95) if latencies else None,
    }


def health(url: str) -> dict[str, Any]:
    import httpx

    return dict(httpx.get(f"{url}/health", timeout=30).json())


def start_server(model: str, port: int, threads: int, max_batch: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p))
    env.pop("LAV2_API_KEY", None)
    env.setdefault("LAV2_ROOT", str(REPO))
    command = [sys.executable, "-m", "llama_adapter_v2.cli.main", "serve", "--model", model,
               "--name", "bench", "--port", str(port), "--max-batch", str(max_batch)]
    with log.open("ab") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"lav2 serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"lav2 serve not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# lav2 serve under load, {result['started_utc']}",
        "",
        f"Model: {result['model']}; {result['max_tokens']} new tokens at most, greedy, one 64x64 image per "
        f"request; server: {result['threads']} torch threads, --max-batch {result['max_batch']}; "
        f"{result['machine']}; load average before: {result['load_average_1m']:.2f}.",
        "",
        "| clients | requests | answered | failed | requests/s | p50 s | p95 s | batches "
        "| largest batch so far |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in result["levels"]:
        p50 = f"{level['p50_s']:.3f}" if level["p50_s"] is not None else "-"
        p95 = f"{level['p95_s']:.3f}" if level["p95_s"] is not None else "-"
        counts = f"| {level['clients']} | {level['requests']} | {level['answered']} | {level['failed']} |"
        lines.append(f"{counts} {level['requests_per_s']:.2f} | {p50} | {p95} | {level['batches']} | "
                     f"{level['largest_batch']} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    model = args.model or str(demo_adapter(scratch, args.base_steps))
    port, log = free_port(), scratch / "server.log"
    url = f"http://127.0.0.1:{port}"
    process = start_server(model, port, args.threads, args.max_batch, log)
    try:
        wait_ready(url, process, log)
        body = request_body("bench", args.max_tokens)
        measure_level(url, body, clients=1, requests=2)  # warm-up, untimed
        levels = []
        for clients in (int(c) for c in args.levels.split(",")):
            before = health(url)
            level = measure_level(url, body, clients=clients,
                                  requests=max(args.min_requests, clients * args.requests_per_client))
            after = health(url)
            level["batches"] = after["batches"] - before["batches"]
            level["largest_batch"] = after["largest_batch"]
            levels.append(level)
            print(f"{clients:>3} clients: {level['requests_per_s']:.2f} requests/s, "
                  f"p50 {level['p50_s']} s, p95 {level['p95_s']} s, {level['batches']} batches", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"model": args.model or "demo shape (configs/demo.yaml), zero-init adapter",
            "max_tokens": args.max_tokens, "threads": args.threads, "max_batch": args.max_batch,
            "levels": levels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="adapter folder, runs:/ or models:/ (default: the demo shape)")
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--base-steps", type=int, default=20, help="demo base training steps (untimed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lav2-serve-load-") as scratch:
        result = run(args, Path(scratch))
    result.update(started_utc=started, load_average_1m=load,
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"Python {platform.python_version()}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-load-{started}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    print(f"results: {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
