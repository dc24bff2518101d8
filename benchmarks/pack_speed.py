#!/usr/bin/env python
"""Pack speed and size (issue 13, point 3): ``kernelprov pack`` vs conda-pack's default vs tar | zstd.

For each ``--size`` env of ``scale_envs.py`` (built once, cached) it packs, round-robin over
``--reps`` repetitions into a scratch dir on ``--out-dir`` (default /dev/shm, so the disk's
write speed is not what is measured):

* ``kernelprov pack --env-prefix P -o k.tar.zst`` — the CLI, manifest (a full re-read + sha256)
  included: conda-pack's packer into kernelprov's multi-frame, multi-threaded zstd writer;
* ``conda_pack.pack(prefix=P, output=c.tar.gz)`` — conda-pack's default (gzip level 4, one thread),
  with ``TMPDIR`` on the same disk so its temporary file is renamed, not copied;
* ``tar -cf - -C P . | zstd -T0 -3`` — the command-line floor (no conda-pack logic at all);
* once, ``conda_pack.pack(format="tar.zst")`` — conda-pack's own zstd (one frame, level 9, one
  thread), for the unpack comparison.

Then what the frames buy at unpack, on this machine's cores: the multi-frame archive to
/dev/null with ``zstd -d`` (one thread), ``pzstd -d -p N`` (frames in parallel), zstandard as the
engine reads it (one stream) and zstandard on N threads frame by frame; and a cold stage
(``kernelprov unpack`` in a fresh cache on ``--out-dir``) of kernelprov's multi-frame archive
against conda-pack's single-frame one. Prints medians and the issue's ratios (PASS/FAIL)::

    python benchmarks/pack_speed.py --size 25k --reps 3
    python benchmarks/pack_speed.py --size 100k --reps 1 --pack-only
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_envs import SIZES, say, scale_env, tree_stats  # noqa: E402

CPUS = len(os.sched_getaffinity(0))


def timed(argv, **kwargs) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, **kwargs)
    return time.perf_counter() - started


def pack_commands(prefix: Path, out: Path) -> dict[str, tuple[list[str], dict, Path]]:
    python = sys.executable
    env = dict(os.environ, TMPDIR=str(out))
    return {
        "kernelprov pack (tar.zst, multi-frame)": (
            [python, "-m", "kernelprov", "pack", "--env-prefix", str(prefix), "-o", str(out / "k.tar.zst"), "--force"],
            {"stdout": subprocess.DEVNULL}, out / "k.tar.zst"),
        "conda_pack.pack default (tar.gz)": (
            [python, "-c", "import sys, conda_pack; conda_pack.pack(prefix=sys.argv[1], output=sys.argv[2], force=True)",
             str(prefix), str(out / "c.tar.gz")], {"env": env}, out / "c.tar.gz"),
        "tar -cf - | zstd -T0 -3": (
            ["sh", "-c", f"tar -cf - -C '{prefix}' . | zstd -q -T0 -3 -f -o '{out / 't.tar.zst'}'"], {}, out / "t.tar.zst"),
    }


def frame_spans(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of each zstd frame of a kernelprov multi-frame archive (pzstd's layout)."""
    spans, offset, end = [], 0, path.stat().st_size
    with open(path, "rb") as f:
        while offset < end:
            f.seek(offset)
            magic, _length, size = struct.unpack("<III", f.read(12))
            if magic != 0x184D2A50:
                raise ValueError(f"{path} is not a multi-frame archive")
            spans.append((offset + 12, size))
            offset += 12 + size
    return spans


def parallel_decompress(path: Path, threads: int) -> None:
    """Decompress every frame of ``path`` on ``threads`` threads, in order, output discarded: what a
    frame-aware reader in the engine could do (at most 2 * threads frames in flight)."""
    import threading

    import zstandard

    local = threading.local()

    def one(span):
        offset, size = span
        if not hasattr(local, "d"):
            local.d = zstandard.ZstdDecompressor()
        with open(path, "rb") as f:
            f.seek(offset)
            return len(local.d.decompress(f.read(size)))

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, frame_spans(path)):
            pass


def stream_decompress(path: Path) -> None:
    import zstandard

    with open(path, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(f, 1 << 20), read_across_frames=True)
        while reader.read(1 << 20):
            pass


def timed_call(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def median(values):
    return statistics.median(values) if values else float("nan")


def run_size(size: str, reps: int, out_root: Path, unpack: bool = True) -> list[tuple[str, float | None, float, str]]:
    prefix = scale_env(size)
    files, others, nbytes = tree_stats(prefix)
    say(f"\n{size} env: {files} files + {others} dirs/links, {nbytes / 1e9:.2f} GB ({prefix})")
    out = Path(tempfile.mkdtemp(prefix=f"kernelprov-pack-{size}-", dir=out_root))
    ratios = []
    try:
        commands = pack_commands(prefix, out)
        times: dict[str, list[float]] = {name: [] for name in commands}
        sizes: dict[str, int] = {}
        for rep in range(reps):
            order = list(commands) if rep % 2 == 0 else list(reversed(commands))
            for name in order:
                argv, kwargs, path = commands[name]
                subprocess.run(["sync"])
                times[name].append(timed(argv, **kwargs))
                sizes[name] = path.stat().st_size
                say(f"  rep {rep + 1}: {name:<42} {times[name][-1]:7.1f} s {sizes[name] / 1e6:8.1f} MB")
        if not unpack:
            report_packing(size, files, reps, out_root, times, sizes, ratios)
            return ratios
        single = out / "conda-pack.tar.zst"
        took = timed([sys.executable, "-c", "import sys, conda_pack; conda_pack.pack(prefix=sys.argv[1], "
                      "output=sys.argv[2], format='tar.zst', force=True)", str(prefix), str(single)],
                     env=dict(os.environ, TMPDIR=str(out)))
        from kernelprov.engine.pack import describe_archive

        describe_archive(single)  # a manifest, so both stages verify the archive's sha256 alike
        times["conda_pack.pack tar.zst (level 9, 1 frame, once)"] = [took]
        sizes["conda_pack.pack tar.zst (level 9, 1 frame, once)"] = single.stat().st_size
        report_packing(size, files, reps, out_root, times, sizes, ratios)

        # What the frames buy at unpack.
        multi = out / "k.tar.zst"
        rows: dict[str, list[float]] = {"zstd -d (1 thread) > /dev/null": [], f"pzstd -d -p {CPUS} > /dev/null": [],
                                        "zstandard stream (the engine's reader)": [],
                                        "zstandard stream, conda-pack single frame": [],
                                        f"zstandard, frames on {CPUS} threads": [],
                                        "stage: kernelprov unpack, multi-frame (ours)": [],
                                        "stage: kernelprov unpack, conda-pack single frame": []}
        for rep in range(reps):
            rows["zstd -d (1 thread) > /dev/null"].append(timed(["zstd", "-q", "-d", "-c", str(multi)], stdout=subprocess.DEVNULL))
            rows[f"pzstd -d -p {CPUS} > /dev/null"].append(
                timed(["pzstd", "-q", "-d", "-c", "-p", str(CPUS), str(multi)], stdout=subprocess.DEVNULL))
            rows["zstandard stream (the engine's reader)"].append(timed_call(stream_decompress, multi))
            rows["zstandard stream, conda-pack single frame"].append(timed_call(stream_decompress, single))
            rows[f"zstandard, frames on {CPUS} threads"].append(timed_call(parallel_decompress, multi, CPUS))
            for label, archive in (("stage: kernelprov unpack, multi-frame (ours)", multi),
                                   ("stage: kernelprov unpack, conda-pack single frame", single)):
                cache = Path(tempfile.mkdtemp(prefix="c", dir=out))
                rows[label].append(timed([sys.executable, "-m", "kernelprov", "unpack", "--quiet", "--cache-dir",
                                          str(cache), str(archive)], stdout=subprocess.DEVNULL))
                shutil.rmtree(cache)
        say(f"\n  Unpack of {size} on {CPUS} CPUs, medians of {reps}")
        for name, values in rows.items():
            say(f"    {name:<50} {median(values):7.2f} s")
        ratios.append((f"{size}: zstd -d / pzstd -d -p {CPUS} (multi-frame speedup, CLI)",
                       median(rows["zstd -d (1 thread) > /dev/null"]) / median(rows[f"pzstd -d -p {CPUS} > /dev/null"]), None, ""))
        ratios.append((f"{size}: zstandard stream / frames on {CPUS} threads",
                       median(rows["zstandard stream (the engine's reader)"]) / median(rows[f"zstandard, frames on {CPUS} threads"]), None, ""))
        ratios.append((f"{size}: stage single-frame / stage multi-frame",
                       median(rows["stage: kernelprov unpack, conda-pack single frame"])
                       / median(rows["stage: kernelprov unpack, multi-frame (ours)"]), None, ""))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return ratios


def report_packing(size, files, reps, out_root, times, sizes, ratios) -> None:
    say(f"\n  Packing {size} ({files} files), medians of {reps}, output on {out_root}")
    reference = "conda_pack.pack default (tar.gz)"
    for name in times:
        say(f"    {name:<50} {median(times[name]):7.1f} s  {sizes[name] / 1e6:8.1f} MB   "
            f"time {median(times[name]) / median(times[reference]):5.2f}x  size {sizes[name] / sizes[reference]:5.3f}x")
    ours = "kernelprov pack (tar.zst, multi-frame)"
    ratios.append((f"{size}: conda-pack default time / kernelprov pack time", median(times[reference]) / median(times[ours]), 1.5, ">="))
    ratios.append((f"{size}: kernelprov .tar.zst size / conda-pack .tar.gz size", sizes[ours] / sizes[reference], 0.9, "<="))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", choices=sorted(SIZES), help="env size (repeatable; default 25k)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path("/dev/shm"), help="where archives are written (default /dev/shm)")
    parser.add_argument("--pack-only", action="store_true",
                        help="skip conda-pack's level-9 tar.zst and the unpack measurements (long at 100k+)")
    args = parser.parse_args(argv)
    ratios = []
    for size in args.size or ["25k"]:
        ratios += run_size(size, args.reps, args.out_dir, unpack=not args.pack_only)
    say("\nRatios")
    for name, value, target, op in ratios:
        status = "" if target is None else ("PASS" if (value >= target if op == ">=" else value <= target) else "FAIL")
        say(f"  {name:<66} {value:6.3f}  {'' if target is None else op + ' ' + str(target):>7}  {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
