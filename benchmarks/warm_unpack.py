#!/usr/bin/env python
"""Warm ``kernelprov unpack`` against ``python -c pass`` from the same interpreter (issue 13, point 4).

``run.sh`` runs ``python -I -m kernelprov unpack --quiet --lease $$ ARCHIVE`` at every kernel start
in clients without provisioner support; once the env is staged that call is pure overhead on the
kernel's start. This script stages a tiny conda-pack archive once into a scratch cache, then
runs, interleaved in a fresh random order each round so that load from other users hits every
row alike::

    python -I -c pass                                       the interpreter's own start
    python -I -c "import kernelprov.engine.stage"           the engine's import floor
    python -I -c "import kernelprov.config"                 what the fast path no longer imports
    python -I -m kernelprov unpack --quiet --lease PID A    exactly what run.sh runs (warm)
    .venv/bin/kernelprov unpack --quiet A                   the console script (warm)

and prints medians, each row minus ``pass`` and each row / ``pass``. Usage::

    python benchmarks/warm_unpack.py --reps 40 [--archive A.tar.zst] [--cache-dir /dev/shm/x]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_SECONDS = 0.060


def tiny_archive(scratch: Path) -> Path:
    """A tiny conda-pack ``.tar.zst`` built from the test suite's tiny env (the warm path's cost
    does not depend on the env's size: it is a walk, a ``stat``, a marker read and a lease)."""
    sys.path.insert(0, str(HERE.parent))
    from tests.tiny_env import build_tiny_env

    from kernelprov.engine.pack import pack_env

    # binary prefix records need the original prefix at least as long as the staged one
    prefix = build_tiny_env(scratch / ("tiny-env-" + "x" * 80))
    archive = scratch / "tiny.tar.zst"
    pack_env(archive, prefix=str(prefix))
    return archive


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=40, help="rounds (default 40)")
    parser.add_argument("--archive", type=Path, help="an archive to stage (default: a tiny one built here)")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: a scratch dir under /dev/shm or $TMPDIR)")
    args = parser.parse_args(argv)

    python = sys.executable
    scratch = Path(tempfile.mkdtemp(prefix="kernelprov-warm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        archive = args.archive.absolute() if args.archive else tiny_archive(scratch)
        env = dict(os.environ, KERNELPROV_CACHE_DIR=str(args.cache_dir or scratch / "cache"))
        Path(env["KERNELPROV_CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
        lease_holder = str(os.getpid())  # run.sh leases for its own PID; ours lives as long as the run
        subprocess.run([python, "-I", "-m", "kernelprov", "unpack", "--quiet", str(archive)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        console = Path(python).with_name("kernelprov")
        rows = {
            "python -I -c pass": [python, "-I", "-c", "pass"],
            "python -I -c 'import kernelprov.engine.stage'": [python, "-I", "-c", "import kernelprov.engine.stage"],
            "python -I -c 'import kernelprov.config' (traitlets; skipped)": [python, "-I", "-c", "import kernelprov.config"],
            "python -I -m kernelprov unpack --quiet --lease PID (run.sh)":
                [python, "-I", "-m", "kernelprov", "unpack", "--quiet", "--lease", lease_holder, str(archive)],
        }
        if console.exists():
            rows["kernelprov unpack --quiet (console script)"] = [str(console), "unpack", "--quiet", str(archive)]
        samples: dict[str, list[float]] = {name: [] for name in rows}
        for name, command in rows.items():  # warm the page cache, unmeasured
            timed(command, env)
        for _ in range(args.reps):
            order = list(rows)
            random.shuffle(order)
            for name in order:
                samples[name].append(timed(rows[name], env))
        floor = statistics.median(samples["python -I -c pass"])
        print(f"Warm path, {args.reps} interleaved rounds, {python}, archive {archive.name}")
        print(f"  {'command':<62} {'median':>8} {'p10':>7} {'p90':>7} {'- pass':>8} {'/ pass':>7}")
        for name, values in samples.items():
            values = sorted(values)
            median = statistics.median(values)
            p10, p90 = values[len(values) // 10], values[(len(values) * 9) // 10]
            print(f"  {name:<62} {median * 1e3:6.1f}ms {p10 * 1e3:5.1f}ms {p90 * 1e3:5.1f}ms "
                  f"{(median - floor) * 1e3:6.1f}ms {median / floor:6.2f}x")
        warm = statistics.median(samples["python -I -m kernelprov unpack --quiet --lease PID (run.sh)"])
        verdict = "PASS" if warm <= TARGET_SECONDS else "FAIL"
        print(f"  target: warm `kernelprov unpack` (run.sh's call) <= {TARGET_SECONDS * 1e3:.0f} ms: "
              f"{warm * 1e3:.1f} ms {verdict} (python -c pass: {floor * 1e3:.1f} ms, overhead {(warm - floor) * 1e3:.1f} ms)")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
