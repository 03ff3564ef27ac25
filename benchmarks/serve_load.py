"""Load test of `chextrain serve` (a real server process on a free 127.0.0.1 port), answers checked.

N requests from C concurrent clients, each answer checked against the single-request answer for its image.

    .venv/bin/python benchmarks/serve_load.py [--backbone tiny|densenet121] [--size 64]
                                              [--requests 200] [--clients 8] [--endpoint predict]

Builds a random-init bundle (nothing is downloaded) and a few demo images in a temp folder, starts
`chextrain serve` on it in a subprocess (stopped at the end, whatever happens), prints p50/p95
latency, throughput and the number of errors (0 expected); exit code 1 if any.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from chextrain.data.demo import write_demo
from chextrain.models.bundle import save_bundle
from chextrain.models.net import CXRNet

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0  # loading torch and the bundle in the server process


def make_bundle(out: Path, backbone: str, size: int) -> Path:
    """A random-init two-head bundle with a router (seeded)."""
    torch.manual_seed(0)
    model = CXRNet(backbone, heads=["digital", "photo"], router=True)
    return save_bundle(model, out, {"image_size": size})


def demo_payloads(out: Path, size: int, count: int = 4) -> list[bytes]:
    """JPEG bytes of `count` demo images (half x-rays, half phone photos)."""
    write_demo(out, digital=4, photos=0, valid=count, size=size, seed=0, workers=1, progress=False)
    files = sorted(out.glob("CheXpert-v1.0-small/valid/*/*/*.jpg"))[: count // 2]
    files += sorted(out.glob("CheXphoto-v1.0/valid/natural/*/*/*/*.jpg"))[: count - len(files)]
    payloads = []
    for f in files:
        buf = io.BytesIO()
        Image.open(f).save(buf, format="JPEG", quality=90)
        payloads.append(buf.getvalue())
    return payloads


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_command(bundle: Path, port: int, runtime: str, threads: int | None) -> list[str]:
    """The `chextrain serve` command line: the console script next to this Python, else `-m chextrain.cli`."""
    script = Path(sys.executable).with_name("chextrain")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "chextrain.cli"]
    cmd += ["serve", str(bundle), "--host", HOST, "--port", str(port), "--runtime", runtime]
    return cmd + (["--threads", str(threads)] if threads else [])


@contextlib.contextmanager
def running_serve(cmd: list[str], url: str, log: Path) -> Iterator[str]:
    """Run `cmd` (a `chextrain serve`) until GET {url}/api/health answers 200, yield `url`, always stop it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"`{' '.join(cmd)}` exited with code {proc.returncode} before answering:\n"
                    f"{log.read_text(errors='replace')[-2000:]}"
                )
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"`{' '.join(cmd)}`: no answer from {url}/api/health in {START_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _key(answer: dict[str, Any]) -> tuple:
    return answer["head"], tuple(round(p["prob"], 5) for p in answer["pathologies"].values())


def run_load(
    url: str, payloads: Sequence[bytes], requests: int, clients: int, endpoint: str = "predict"
) -> dict[str, Any]:
    """Send `requests` uploads from `clients` threads; latencies, errors and wrong answers."""
    with httpx.Client(base_url=url, timeout=120) as c:
        expected = [_key(c.post(f"/api/{endpoint}", files={"file": ("x.jpg", p)}).json()) for p in payloads]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    upload = {"file": (f"img{i}.jpg", payloads[i % len(payloads)])}
                    r = c.post(f"/api/{endpoint}", files=upload)
                    problem = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                    if problem is None and _key(r.json()) != expected[i % len(payloads)]:
                        problem = f"request {i}: answer differs from the single-request answer"
                except httpx.HTTPError as err:
                    problem = f"request {i}: {type(err).__name__}: {err}"
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if problem:
                        errors.append(problem)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(latencies),
        "clients": clients,
        "errors": errors,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": 1000 * q[49],
        "p95_ms": 1000 * q[94],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the load test, print the figures; return them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--size", type=int, default=64, help="the bundle's image size")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--endpoint", default="predict", choices=["predict", "explain"])
    ap.add_argument("--runtime", default="torch", choices=["torch", "onnx"])
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.clients < 1:
        ap.error(f"--requests {args.requests} and --clients {args.clients} must both be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp) / "bundle", args.backbone, args.size)
        payloads = demo_payloads(Path(tmp) / "demo", max(args.size, 64))
        port = free_port()
        cmd = serve_command(bundle, port, args.runtime, args.threads)
        with running_serve(cmd, f"http://{HOST}:{port}", Path(tmp) / "serve.log") as url:
            stats = run_load(url, payloads, args.requests, args.clients, args.endpoint)
    threads = args.threads or torch.get_num_threads()
    print(
        f"serve load: {args.backbone} {args.size}px {args.runtime}, /api/{args.endpoint}, "
        f"{stats['requests']} requests, {stats['clients']} clients, {threads} threads"
    )
    print(
        f"  errors {len(stats['errors'])}  p50 {stats['p50_ms']:.1f} ms  p95 {stats['p95_ms']:.1f} ms  "
        f"throughput {stats['throughput_rps']:.1f} req/s  wall {stats['wall_s']:.1f} s"
    )
    for e in stats["errors"][:5]:
        print("  error:", e)
    return stats


if __name__ == "__main__":
    raise SystemExit(1 if main()["errors"] else 0)
