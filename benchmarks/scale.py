#!/usr/bin/env python
"""Staging at the scale of real cluster envs (issue 13, point 1): 25k, 100k, 300k files.

For each ``--size`` (envs and archives built once and cached by ``scale_envs.py``: real
pip-installed packages, grown by copies of their own trees under distinct names) and each
``--target`` disk, round-robin over ``--reps`` repetitions (fresh dir every time, trees deleted
right after they are measured):

* **kernelprov stage** of ``kernelprov pack``'s ``.tar.zst`` and of conda-pack's default
  ``.tar.gz``: ``python -m kernelprov unpack --cache-dir <fresh>`` in a child process, whose peak
  RSS comes from ``wait4``'s ``getrusage`` in a small helper process that starts it (so it is the
  stage's own, not this script's: a child inherits its parent's high-water mark);
* **cp -a** of the staged tree on the same disk: the floor of creating this many files;
* GNU ``tar -I zstd -xf`` (the ``.tar.zst``), the **manual recipe** ``tar -xzf`` + ``conda-unpack``,
  ``bsdtar -xf`` (the ``.tar.zst``) and ``unsquashfs`` of a squashfs image of the same env;
* with ``--image``, **kernelprov image mode cold**: ``kernelprov unpack`` of ``kernelprov pack
  --format squashfs``'s image (copy + mount with squashfuse, or unsquashfs where FUSE is missing).

It prints medians, time per file and the issue's ratios: stage ``.tar.zst`` / ``cp -a`` ≤ 1.3 at
every size, time per file at the largest size within 1.2x of the smallest, stage peak RSS ≤
150 MB. The run is long at 300k, so run one size at a time::

    python benchmarks/scale.py --size 25k --size 100k --target /dev/shm --target /var/tmp --reps 3
    python benchmarks/scale.py --size 300k --reps 1
    python benchmarks/scale.py --clean 300k          # remove that env and its archives

Disk use: the env (~0.65 GB per 25k files) and its archives under ~/.cache/kernelprov, plus two
trees at a time on each target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_envs  # noqa: E402
from scale_envs import SIZES, archive_dir, archives, say, scale_env, tree_stats  # noqa: E402

HERE = Path(__file__).resolve().parent


#: Runs argv[1:] and prints "<seconds> <peak RSS in KiB>" of it. Measured from this small process,
#: not from the benchmark itself: Linux carries a parent's RSS high-water mark into a child it
#: forks (or vforks) and execs, so once this script grows (building a 300k env in-process makes
#: it ~330 MiB) every child it starts directly would report at least that much.
_RUSAGE_HELPER = """
import os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_pid, status, usage = os.wait4(child.pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(argv: list[str]) -> tuple[float, int]:
    """Run ``argv``; return (seconds, peak RSS of the child in bytes, from wait4's rusage), both
    measured by :data:`_RUSAGE_HELPER` around the child alone."""
    done = subprocess.run([sys.executable, "-I", "-c", _RUSAGE_HELPER, *argv], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, argv)
    seconds, peak_kib = done.stdout.split()
    return float(seconds), int(peak_kib) * 1024


def squashfs_image(size: str, prefix: Path) -> Path | None:
    """A squashfs image of the env (zstd level 3, like the .tar.zst), cached with the archives."""
    if not shutil.which("mksquashfs"):
        return None
    path = archive_dir(size) / "reference.squashfs"  # env.squashfs is kernelprov pack's image-mode image
    if not path.is_file():
        say(f"  mksquashfs {size} → {path}")
        partial = path.with_name(".partial-" + path.name)
        subprocess.run(["mksquashfs", str(prefix), str(partial), "-comp", "zstd", "-Xcompression-level", "3", "-noappend", "-quiet", "-no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        os.replace(partial, path)
    return path


def filesystem(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()
    return out or "?"


class Target:
    """One disk: a scratch dir, a reference tree for ``cp -a``, and fresh dirs for each run."""

    def __init__(self, root: Path, size: str):
        self.root = Path(tempfile.mkdtemp(prefix=f"kernelprov-scale-{size}-", dir=root))
        self.fstype = filesystem(self.root)
        self.count = 0

    def fresh(self) -> Path:
        self.count += 1
        path = self.root / f"r{self.count}"
        path.mkdir()
        return path

    def remove(self, path: Path) -> None:
        # An image-mode stage left a mount (or an unsquashfs'd tree at the image's baked mount
        # point): `kernelprov cache clean` takes it down, as an admin would. Never timed.
        subprocess.run([sys.executable, "-m", "kernelprov", "cache", "clean", "--cache-dir", str(path)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["sync"])

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def measure_size(size: str, targets: list[Path], reps: int, image_mode: bool = False) -> dict:
    prefix = scale_env(size)
    files, others, nbytes = tree_stats(prefix)
    packed = archives(size, prefix, ("tar.zst", "tar.gz", "squashfs") if image_mode else ("tar.zst", "tar.gz"))
    image = squashfs_image(size, prefix)
    say(f"\n{size} env: {files} files + {others} dirs/links, {nbytes / 1e9:.2f} GB; archives: "
        + ", ".join(f"{fmt} {p.stat().st_size / 1e6:.0f} MB" for fmt, p in packed.items())
        + (f", mksquashfs image {image.stat().st_size / 1e6:.0f} MB" if image else ""))
    python = sys.executable
    result = {"size": size, "files": files, "others": others, "bytes": nbytes, "targets": {}}
    for root in targets:
        root.mkdir(parents=True, exist_ok=True)
        target = Target(root, size)
        samples: dict[str, list[float]] = {}
        rss: dict[str, list[int]] = {}
        try:
            # The cp -a source: a staged, relocated tree on this disk.
            reference = target.fresh()
            subprocess.run([python, "-m", "kernelprov", "unpack", "--quiet", "--cache-dir", str(reference),
                            str(packed["tar.zst"])], check=True, stdout=subprocess.DEVNULL)
            source = next((reference / f"kernelprov-{os.environ.get('USER') or 'root'}").glob("*/"), None) \
                or next(reference.glob("kernelprov-*/*/"))

            def stage(fmt):
                def run(dest):
                    return run_child([python, "-m", "kernelprov", "unpack", "--quiet", "--cache-dir", str(dest),
                                      str(packed[fmt])])
                return run

            def shell(command):
                def run(dest):
                    return run_child(["sh", "-c", command.format(dest=dest)])
                return run

            variants = {
                "kernelprov stage .tar.zst": stage("tar.zst"),
                "kernelprov stage .tar.gz": stage("tar.gz"),
                "cp -a (floor)": shell(f"cp -a '{source}' '{{dest}}/env'"),
                "GNU tar -I zstd -xf .tar.zst": shell(f"tar -I zstd -xf '{packed['tar.zst']}' -C '{{dest}}'"),
                "manual: tar -xzf + conda-unpack": shell(
                    f"tar -xzf '{packed['tar.gz']}' -C '{{dest}}' && '{{dest}}/bin/python' '{{dest}}/bin/conda-unpack'"),
            }
            if shutil.which("bsdtar"):
                variants["bsdtar -xf .tar.zst"] = shell(f"bsdtar -xf '{packed['tar.zst']}' -C '{{dest}}'")
            if "squashfs" in packed:
                variants["kernelprov image mode cold (.squashfs)"] = stage("squashfs")
            if image:
                variants["unsquashfs (zstd image)"] = shell(f"unsquashfs -q -n -d '{{dest}}/env' '{image}' >/dev/null")
            for rep in range(reps):
                order = list(variants)
                random.shuffle(order)
                for name in order:
                    dest = target.fresh()
                    try:
                        seconds, peak = variants[name](dest)
                    except subprocess.CalledProcessError as err:
                        say(f"    {name}: failed ({err})")
                        continue
                    finally:
                        target.remove(dest)
                    samples.setdefault(name, []).append(seconds)
                    rss.setdefault(name, []).append(peak)
                    say(f"  {size} {root} rep {rep + 1}: {name:<34} {seconds:7.2f} s  peak RSS {peak / 2**20:6.0f} MiB")
        finally:
            target.close()
        result["targets"][str(root)] = {"fstype": target.fstype, "samples": samples, "rss": rss}
    return result


def report(results: list[dict]) -> None:
    say("\n" + "=" * 100)
    for r in results:
        for root, t in r["targets"].items():
            say(f"\n{r['size']} ({r['files']} files, {r['bytes'] / 1e9:.2f} GB) on {root} ({t['fstype']}), medians")
            cp = statistics.median(t["samples"]["cp -a (floor)"]) if t["samples"].get("cp -a (floor)") else None
            say(f"  {'measurement':<36} {'median':>8} {'µs/file':>8} {'× cp -a':>8} {'peak RSS':>9}")
            for name, values in t["samples"].items():
                m = statistics.median(values)
                say(f"  {name:<36} {m:7.2f}s {m / r['files'] * 1e6:8.1f} {m / cp if cp else float('nan'):8.2f} "
                    f"{max(t['rss'][name]) / 2**20:6.0f} MiB")
    say("\nRatios (targets of issue 13)")
    by_target: dict[str, list[tuple[dict, dict]]] = {}
    for r in results:
        for root, t in r["targets"].items():
            by_target.setdefault(root, []).append((r, t))
            zst = t["samples"].get("kernelprov stage .tar.zst")
            cp = t["samples"].get("cp -a (floor)")
            if zst and cp:
                value = statistics.median(zst) / statistics.median(cp)
                say(f"  {r['size']:>5} {root:<16} stage .tar.zst / cp -a          {value:6.2f}  <= 1.3  {'PASS' if value <= 1.3 else 'FAIL'}")
            peak = max(max(t["rss"].get(k, [0])) for k in ("kernelprov stage .tar.zst", "kernelprov stage .tar.gz"))
            say(f"  {r['size']:>5} {root:<16} stage peak RSS (MiB)             {peak / 2**20:6.0f}  <= 150  {'PASS' if peak <= 150 * 2**20 else 'FAIL'}")
    for root, rows in by_target.items():
        rows = [(r, t) for r, t in rows if t["samples"].get("kernelprov stage .tar.zst")]
        if len(rows) >= 2:
            small, large = min(rows, key=lambda x: x[0]["files"]), max(rows, key=lambda x: x[0]["files"])
            per = [statistics.median(t["samples"]["kernelprov stage .tar.zst"]) / r["files"] for r, t in (small, large)]
            value = per[1] / per[0]
            say(f"  {large[0]['size']}/{small[0]['size']} {root:<12} time per file, largest / smallest {value:6.2f}  <= 1.2  "
                f"{'PASS' if value <= 1.2 else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", choices=sorted(SIZES), help="env size (repeatable; default 25k and 100k)")
    parser.add_argument("--target", action="append", type=Path, help="disk to stage on (repeatable; default /dev/shm and /var/tmp)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clean", action="append", choices=sorted(SIZES), metavar="SIZE",
                        help="remove the cached env and archives of SIZE and exit")
    parser.add_argument("--image", action="store_true",
                        help="also stage in image mode (packs a squashfs image per size first: minutes at 300k)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.clean:
        for size in args.clean:
            scale_envs.clean(size)
            say(f"removed the {size} env and its archives")
        return 0
    targets = [t.absolute() for t in (args.target or [Path("/dev/shm"), Path("/var/tmp")])]
    results = [measure_size(size, targets, args.reps, args.image) for size in (args.size or ["25k", "100k"])]
    report(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    say(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
