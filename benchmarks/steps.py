#!/usr/bin/env python
"""What each step of kernelprov's unpack engine bought, measured side by side in one run.

    python benchmarks/steps.py --target /dev/shm --reps 3

Companion of ``cold_start.py`` (same cached benchmark env and archives). Where ``cold_start.py``
measures whole kernel starts, this measures only staging (archive → relocated env on the target,
the part the engine changes; a kernel start adds the same ~0.5 s to every row), for a ladder of
variants, round-robin over ``--reps`` repetitions, fresh directory each time, medians:

0. for reference, the manual recipe: GNU ``tar -xzf`` + ``conda-unpack``;
1. the standard library's way: ``tarfile.extractall(filter="data")`` of the ``.tar.gz`` (zlib)
   and ``bin/python bin/conda-unpack`` in a second process;
2. kernelprov's engine with zlib and no read-ahead thread (its lean tar reader, members validated
   once, links checked by the data filter only, in-process relocation);
3. + ISA-L (``isal``) instead of zlib for gzip;
4. + the read-ahead thread (decompression and hashing overlap with writing): today's ``.tar.gz``;
5. ``.tar.zst`` without the read-ahead thread;
6. ``.tar.zst`` with it: today's default;
7. squashfs image mode (copy + ``squashfuse_ll`` mount), when FUSE works here.

Variants 2–5 switch the engine's own pieces off by replacing them in this process (benchmark
only: ``kernelprov.engine.streams.ReadAhead`` by a pass-through, ISA-L by zlib). Prints a table (seconds, × the
standard library's way, gain over the row before) and writes ``steps-<stamp>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cold_start  # noqa: E402 - the env, archives and helpers of the main benchmark

from kernelprov.engine import extract as engine  # noqa: E402
from kernelprov.engine.inventory import clean  # noqa: E402
from kernelprov.engine.stage import ensure_staged  # noqa: E402
from kernelprov.engine.streams import CHUNK  # noqa: E402


class _Serial:
    """Stands in for ``kernelprov.engine.streams.ReadAhead``: the caller's thread decompresses, as before it."""

    def __init__(self, stream, *args, **kwargs):
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def __enter__(self) -> "_Serial":
        return self

    def __exit__(self, *exc_info) -> None:
        pass


@contextmanager
def engine_variant(*, read_ahead: bool, isal: bool) -> Iterator[None]:
    """Switch the read-ahead thread and ISA-L off in this process for the duration."""
    saved = engine.ReadAhead, engine.decompressor
    original = engine.decompressor

    def zlib_decompressor(fmt: str, raw):
        if fmt == "tar.gz":
            return gzip.GzipFile(fileobj=io.BufferedReader(raw, CHUNK), mode="rb")
        return original(fmt, raw)

    if not read_ahead:
        engine.ReadAhead = _Serial
    if not isal:
        engine.decompressor = zlib_decompressor
    try:
        yield
    finally:
        engine.ReadAhead, engine.decompressor = saved


def stdlib_way(archive: Path, dest: Path) -> None:
    """tarfile's data filter on every member, then conda-pack's own unpack script."""
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    subprocess.run([str(dest / "bin" / "python"), str(dest / "bin" / "conda-unpack")], check=True)


def manual_way(archive: Path, dest: Path) -> None:
    """The job-script recipe: GNU tar, then conda-pack's unpack script."""
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest)], check=True)
    subprocess.run([str(dest / "bin" / "python"), str(dest / "bin" / "conda-unpack")], check=True)


def engine_way(archive: Path, dest: Path, *, read_ahead: bool = True, isal: bool = True) -> None:
    with engine_variant(read_ahead=read_ahead, isal=isal):
        staged = ensure_staged(archive, cache_root=dest)
    assert staged.extracted and (staged.prefix / "bin" / "python").exists()


def variants(archives: dict[str, Path]) -> list[tuple[str, str, Callable[[Path], None]]]:
    gz, zst = archives["tar.gz"], archives["tar.zst"]
    ladder = [
        ("manual", "reference: GNU tar -xzf + conda-unpack (the manual recipe)", lambda d: manual_way(gz, d)),
        ("stdlib", "tarfile.extractall(filter='data') + conda-unpack (tar.gz, zlib)", lambda d: stdlib_way(gz, d)),
        ("engine-zlib", "kernelprov engine, zlib, no read-ahead (tar.gz)", lambda d: engine_way(gz, d, read_ahead=False, isal=False)),
        ("engine-isal", "+ ISA-L for gzip (tar.gz)", lambda d: engine_way(gz, d, read_ahead=False)),
        ("engine-isal-ahead", "+ read-ahead thread (tar.gz, today's engine)", lambda d: engine_way(gz, d)),
        ("engine-zst", ".tar.zst, no read-ahead", lambda d: engine_way(zst, d, read_ahead=False)),
        ("engine-zst-ahead", ".tar.zst + read-ahead thread (today's default)", lambda d: engine_way(zst, d)),
    ]
    if "squashfs" in archives:
        ladder.append(("image", "squashfs image mode: copy + FUSE mount", lambda d: engine_way(archives["squashfs"], d)))
    return ladder


def measure(target: Path, ladder, reps: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {key: [] for key, _label, _run in ladder}
    for rep in range(reps):
        for key, label, run_variant in ladder:
            dest = Path(tempfile.mkdtemp(prefix=f"steps-{key}-", dir=target))
            cold_start.settle()
            started = time.perf_counter()
            run_variant(dest)
            samples[key].append(time.perf_counter() - started)
            cold_start.say(f"  rep {rep + 1}/{reps}  {label:<66} {samples[key][-1]:6.2f} s")
            clean(cache_root=dest)  # unmounts an image; a no-op otherwise
            cold_start.remove_tree(dest)
    return samples


def main(argv: list[str] | None = None) -> int:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kernelprov"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")), help="disk to stage on")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--env-cache", type=Path, default=cache / "bench-env")
    parser.add_argument("--archive-dir", type=Path, default=cache / "bench-archives")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    target = args.target.absolute()
    target.mkdir(parents=True, exist_ok=True)

    prefix = cold_start.build_env(args.env_cache)
    out_dir = cold_start.archive_cache_dir(prefix, args.archive_dir)
    archives, _failed, _seconds = cold_start.pack_archives(prefix, out_dir, ["tar.gz", "tar.zst"])
    os.environ["KERNELPROV_IMAGE_ROOT"] = str(cold_start.image_root_for(target))
    from kernelprov.engine.image import fuse_available

    if fuse_available() and shutil.which("mksquashfs"):
        archives["squashfs"] = cold_start.pack_squashfs_for(prefix, out_dir, target)
    files, others, size = cold_start.tree_stats(prefix)
    fstype = cold_start.filesystem_type(target)
    cold_start.say(f"env: {files} files + {others} dirs/links, {size / 1e6:.0f} MB; target {target} ({fstype})")

    ladder = variants(archives)
    samples = measure(target, ladder, args.reps)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    base = medians["stdlib"]
    cold_start.say(f"\nStaging only (archive → relocated env), {target} ({fstype}), medians of {args.reps}")
    cold_start.say(f"  {'variant':<66} {'median':>7} {'× stdlib':>9} {'step':>7}")
    previous = None
    rows = []
    for key, label, _run in ladder:
        step = "" if previous is None or key in ("manual", "stdlib", "engine-zst", "image") else f"{medians[key] / previous:6.2f}×"
        cold_start.say(f"  {label:<66} {medians[key]:6.2f}s {medians[key] / base:8.2f}× {step:>7}")
        rows.append({"variant": key, "label": label, "samples": samples[key], "median": medians[key],
                     "vs_stdlib": medians[key] / base})
        previous = medians[key]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"steps-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"target": str(target), "fstype": fstype, "reps": args.reps,
                                "env": {"files": files, "dirs_and_links": others, "bytes": size},
                                "engine": cold_start.engine_info(), "rows": rows}, indent=1))
    cold_start.say(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
