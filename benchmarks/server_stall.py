#!/usr/bin/env python
"""Does the Jupyter server stall while the provisioner stages a big env? (issue 13, point 2)

Starts a real ``jupyter server`` (scratch Jupyter dirs, a token, a fresh ``KERNELPROV_CACHE_DIR``
on ``--target``), installs a kernelprov kernel for the ``--size`` env's ``.tar.zst`` (built and
packed once by ``scale_envs.py``), and samples ``GET /api/status`` every 100 ms from this
process: for ``--idle`` seconds with nothing going on, then while ``POST /api/kernels`` starts
that kernel (the provisioner stages the env cold, in its worker thread, inside the server
process), until the kernel is up. Prints p50/p99/max latency of both phases; the target is p99 ≤
100 ms while staging. With ``--profile`` it also runs ``py-spy dump`` on the server a few times
while it stages, to show what holds the GIL::

    python benchmarks/server_stall.py --size 100k --target /dev/shm
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_envs import SIZES, archives, say, scale_env  # noqa: E402

INTERVAL = 0.1
TOKEN = "kernelprov-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 600.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"token {TOKEN}"}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def sample(port: int, stop: threading.Event, out: list[tuple[float, float]], errors: list[str]) -> None:
    """GET /api/status every INTERVAL seconds (a fresh connection each, as a browser poll would
    often make) until ``stop``; append (start time, latency), and any non-200 answer to ``errors``."""
    next_at = time.perf_counter()
    while not stop.is_set():
        started = time.perf_counter()
        status, body = request(port, "GET", "/api/status", timeout=60)
        out.append((started, time.perf_counter() - started))
        if status != 200:
            errors.append(f"{status} at {started:.1f}: {body[:200]!r}")
        next_at += INTERVAL
        time.sleep(max(0.0, next_at - time.perf_counter()))


def percentiles(latencies: list[float]) -> str:
    values = sorted(latencies)
    if not values:
        return "no samples"
    p = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return (f"n={len(values):4d}  p50 {statistics.median(values) * 1e3:6.1f} ms  p99 {p(0.99) * 1e3:7.1f} ms  "
            f"max {values[-1] * 1e3:7.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100k")
    parser.add_argument("--target", type=Path, default=Path("/dev/shm"), help="node-local disk of the cache")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle sampling first")
    parser.add_argument("--profile", action="store_true", help="py-spy dump the server while it stages")
    args = parser.parse_args(argv)

    prefix = scale_env(args.size)
    archive = archives(args.size, prefix, formats=("tar.zst",))["tar.zst"]
    scratch = Path(tempfile.mkdtemp(prefix="kernelprov-stall-"))
    cache = Path(tempfile.mkdtemp(prefix="kernelprov-stall-cache-", dir=args.target))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for name in ("data", "config", "runtime", "ipython", "work"):
        (scratch / name).mkdir()
    env.update(JUPYTER_DATA_DIR=str(scratch / "data"), JUPYTER_PATH=str(scratch / "data"),
               JUPYTER_CONFIG_DIR=str(scratch / "config"), JUPYTER_RUNTIME_DIR=str(scratch / "runtime"),
               IPYTHONDIR=str(scratch / "ipython"), JUPYTER_PLATFORM_DIRS="1", KERNELPROV_CACHE_DIR=str(cache))
    bindir = Path(sys.executable).parent
    subprocess.run([str(bindir / "kernelprov"), "install", "stall", "--archive", str(archive), "--display-name", "stall"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    log = open(scratch / "server.log", "w")
    server = subprocess.Popen([str(bindir / "jupyter-server"), "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                               f"--IdentityProvider.token={TOKEN}", "--allow-root", f"--ServerApp.root_dir={scratch / 'work'}"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if request(port, "GET", "/api/status", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            log.flush()
            raise SystemExit("jupyter server did not answer:\n" + (scratch / "server.log").read_text()[-3000:])
        samples: list[tuple[float, float]] = []
        errors: list[str] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(port, stop, samples, errors), daemon=True)
        sampler.start()
        time.sleep(args.idle)
        started = time.perf_counter()
        dumps: list[str] = []
        py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(bindir))
        if args.profile and py_spy:
            def dump():
                for _ in range(5):
                    time.sleep(2.0)
                    out = subprocess.run([py_spy, "dump", "--pid", str(server.pid)], capture_output=True, text=True)
                    dumps.append(out.stdout)
            threading.Thread(target=dump, daemon=True).start()
        staged_at: list[float] = []

        def watch_marker():
            # The marker <key>.json is written last when the env is published: the end of staging.
            while not staged_at and not stop.is_set():
                if any(p.suffix == ".json" for d in cache.glob("kernelprov-*") for p in d.iterdir() if p.is_file()):
                    staged_at.append(time.perf_counter())
                time.sleep(0.02)

        threading.Thread(target=watch_marker, daemon=True).start()
        status, body = request(port, "POST", "/api/kernels", {"name": "stall"})
        ready = time.perf_counter()
        staged = staged_at[0] if staged_at else ready
        if status not in (200, 201):
            raise SystemExit(f"starting the kernel failed: {status} {body[:300]!r}")
        kernel = json.loads(body)["id"]
        time.sleep(1.0)
        stop.set()
        sampler.join()
        request(port, "DELETE", f"/api/kernels/{kernel}")
        idle = [lat for at, lat in samples if at < started]
        busy = [lat for at, lat in samples if started <= at < staged]
        launch = [lat for at, lat in samples if staged <= at < ready]
        say(f"GET /api/status every {INTERVAL * 1e3:.0f} ms, jupyter server + kernelprov provisioner, "
            f"{args.size} env .tar.zst ({archive.stat().st_size / 1e6:.0f} MB) staged cold on {args.target}")
        say(f"  idle ({args.idle:.0f} s)                         {percentiles(idle)}")
        say(f"  while staging ({staged - started:5.1f} s)               {percentiles(busy)}")
        say(f"  then the kernel's launch ({ready - staged:4.1f} s)     {percentiles(launch)}")
        p99 = sorted(busy)[min(len(busy) - 1, int(0.99 * len(busy)))] if busy else float("nan")
        say(f"  target p99 <= 100 ms while staging: {p99 * 1e3:.1f} ms {'PASS' if p99 <= 0.1 else 'FAIL'}")
        worst = sorted(((lat, at - started) for at, lat in samples if started <= at < staged), reverse=True)[:5]
        say("  slowest samples while staging (latency, seconds after the start): "
            + ", ".join(f"{lat * 1e3:.0f} ms @ {t:.1f} s" for lat, t in worst))
        for error in errors:
            say(f"  /api/status error: {error} (the run started at {started:.1f})")
        for text in dumps:
            say("--- py-spy dump of the server while staging ---")
            say(text)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
