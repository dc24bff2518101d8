#!/usr/bin/env python
"""What each kernel transport costs (issue 11, point 10): ipc vs curve vs plain tcp, side by side.

    python benchmarks/transport.py --reps 5

Builds (once, cached under ``~/.cache/kernelprov/transport-env``) a small conda-format env with
ipykernel, packs it, installs it as a kernelprov kernel in a scratch Jupyter dir and stages it once.
Then, round-robin over ``--reps``, for each transport it starts a warm kernel through
``jupyter_client`` (until the ``kernel_info`` reply) and times 50 ``execute`` round trips. Prints
medians and the ratios to plain tcp.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TRANSPORTS = ("ipc", "curve", "tcp")


async def _one(kernel: str, transport: str, round_trips: int) -> tuple[float, float]:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel)
    km.kernel_spec.metadata["kernel_provisioner"]["config"]["kernel_transport"] = transport
    started = time.perf_counter()
    await km.start_kernel(stderr=open(os.devnull, "w"))  # noqa: SIM115
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=120)
        start = time.perf_counter() - started
        t0 = time.perf_counter()
        for _ in range(round_trips):
            reply = await client.execute("pass", reply=True, timeout=60)
            assert reply["content"]["status"] == "ok"
        per_call = (time.perf_counter() - t0) / round_trips
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=True)
    return start, per_call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=50)
    args = parser.parse_args(argv)

    from kernelprov.cli.app import main as cli
    from kernelprov.cli.demo_env import cached_conda_env
    from kernelprov.engine.pack import pack_env

    cache = Path.home() / ".cache" / "kernelprov" / "transport-env"
    env = cached_conda_env(cache, packages=("ipykernel",))
    scratch = Path(tempfile.mkdtemp(prefix="kernelprov-transport-"))
    for name in ("JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        os.environ[name] = str(scratch / name.lower())
    os.environ["JUPYTER_PATH"] = os.environ["JUPYTER_DATA_DIR"]
    os.environ["KERNELPROV_CACHE_DIR"] = str(scratch / "cache")
    (scratch / "cache").mkdir()
    archive = scratch / "bench.tar.zst"
    pack_env(archive, prefix=env)
    assert cli(["install", "bench", "--archive", str(archive)]) == 0
    assert cli(["unpack", "--quiet", str(archive)]) == 0  # warm: only the transport differs

    samples: dict[str, list[tuple[float, float]]] = {t: [] for t in TRANSPORTS}
    try:
        for _ in range(args.reps):
            for transport in TRANSPORTS:
                samples[transport].append(asyncio.run(_one("bench", transport, args.round_trips)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{'transport':10} {'start (s)':>10} {'execute (ms)':>13} {'start/tcp':>10} {'execute/tcp':>12}")
    tcp_start = statistics.median(s for s, _ in samples["tcp"])
    tcp_call = statistics.median(c for _, c in samples["tcp"])
    for transport in TRANSPORTS:
        start = statistics.median(s for s, _ in samples[transport])
        call = statistics.median(c for _, c in samples[transport])
        print(f"{transport:10} {start:10.3f} {call * 1e3:13.2f} {start / tcp_start:10.2f} {call / tcp_call:12.2f}")
    print(f"\n{args.reps} warm starts per transport, {args.round_trips} execute round trips each; medians. Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
