#!/usr/bin/env python
"""Where does a kernelprov cold extraction spend its time?  (companion of cold_start.py)

    python benchmarks/profile_extract.py ARCHIVE [ARCHIVE ...] --target /dev/shm [--reps 3]

For each archive, on the ``--target`` disk:

1. times ``kernelprov.engine.stage.ensure_staged`` into a fresh cache (the installed engine, unprofiled);
2. times kernelprov's read pipeline layer by layer without writing (hash; + decompress; + tar
   parse; + member validation), so the rest of ``ensure_staged`` is writing the tree;
3. samples it with **py-spy** (``--idle``, so time blocked in system calls counts) and sorts every
   sample by what it was doing — decompression, reading the archive, hashing, tar header parsing,
   the ``tarfile.data_filter`` second opinion, mkdir, file creation, writes, utime/chmod, close,
   the final directory pass, relocation, the extractor's own Python — from the stack and the
   source line of its innermost frame (falls back to cProfile when py-spy is missing);
4. counts system calls with ``strace -c -f`` for ``ensure_staged``, GNU ``tar -x`` of the same
   archive and ``cp -a`` of the unpacked tree, and times those two as the floors.

Prints one table per archive and writes ``profile-<stamp>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import linecache
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GNU_TAR_FLAGS = {"tar.zst": ["-I", "zstd"], "tar.gz": ["-z"], "tar.bz2": ["-j"], "tar.xz": ["-J"], "tar": []}

# (category, test on the whole stack) — checked first, in order.
_STACK_RULES = [
    ("relocation (relocate.py)", lambda frames: any(f[1].endswith("relocate.py") for f in frames)),
    ("tarfile.data_filter second opinion", lambda frames: any(f[0] in ("_second_opinion", "data_filter") for f in frames)),
    ("finish: symlink check + dir chmod/utime", lambda frames: any(f[0] == "finish" and f[1].endswith("treewriter.py") for f in frames)),
    ("hashing (sha256)", lambda frames: any("sha256" in f[3] for f in frames[-1:])),
    ("read archive file", lambda frames: any("_raw.readinto" in f[3] for f in frames[-1:])),
    ("manifest / marker / lock / space check", lambda frames: any(
        f[1].endswith(("manifest.py", "cache.py")) or f[0] in ("ensure_space", "check_unchanged") for f in frames)),
    ("cleanup / rmtree", lambda frames: any(f[1].endswith("shutil.py") for f in frames)),
]
# (category, regex on the innermost frame's source line when it is in the engine's extract.py, treewriter.py or streams.py).
_LINE_RULES = [
    ("create file (open O_CREAT|O_EXCL)", r"os\.open\("),
    ("write file data", r"os\.write\("),
    ("utime (files, links)", r"os\.utime\("),
    ("chmod / fchmod", r"chmod\("),
    ("mkdir", r"os\.mkdir\("),
    ("close", r"os\.close\("),
    ("symlink / link", r"os\.(sym)?link\("),
    ("unlink", r"os\.unlink\("),
]
_DECOMPRESSORS = ("isal", "igzip", "gzip.py", "_compression.py", "bz2.py", "lzma.py", "zstandard", "zlib")


_TARFILE_BUFFERING = ("_Stream.__read", "_Stream.read", "_Stream._read", "_Stream.seek", "_FileInFile", "ExFileObject",
                      "TarFile.extractfile", "BufferedReader")


def classify(frames: list[tuple[str, str, int, str]]) -> str:
    """Name what a sampled stack was doing; ``frames`` outermost first, each (function, file, line, source)."""
    for name, test in _STACK_RULES:
        if test(frames):
            return name
    function, filename, _line, source = frames[-1]
    if filename.endswith(("extract.py", "treewriter.py", "streams.py")):
        for name, pattern in _LINE_RULES:
            if re.search(pattern, source):
                return name
        return "extractor Python (treewriter.py)"
    if any(part in filename for part in _DECOMPRESSORS):
        return "decompression"
    stream_frames = [f for f in frames if f[1].endswith("tarstream.py")]
    if stream_frames:  # kernelprov's own tar reader (replaced tarfile in 5006947)
        innermost = stream_frames[-1]
        if "_stream.read" in innermost[3]:
            return "decompression"
        if ".join(" in innermost[3]:
            return "tar reader: buffer joins (tarstream.py)"
        return "tar reader: header parsing (tarstream.py)"
    tar_frames = [f for f in frames if f[1].endswith("tarfile.py")]
    if tar_frames:
        innermost = tar_frames[-1]
        # The decompressor is C code called from this tarfile line; the sample lands on it.
        if innermost[0].endswith("__read") and "fileobj.read" in innermost[3]:
            return "decompression"
        if innermost[0].startswith(_TARFILE_BUFFERING):
            return "tarfile: member data buffering (Python)"
        return "tarfile: header parsing (Python)"
    if filename.endswith("posixpath.py") or filename.endswith("genericpath.py"):
        return "path handling (posixpath)"
    return f"other ({os.path.basename(filename)}:{function})"


_PYSPY_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")


def parse_pyspy_raw(path: Path) -> collections.Counter:
    """Collapse py-spy's ``--format raw`` stacks into category → samples."""
    counts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for frame in stack.split(";"):
            match = _PYSPY_FRAME.match(frame.strip())
            if not match:
                continue
            filename, lineno = match.group("file"), int(match.group("line"))
            frames.append((match.group("function"), filename, lineno, linecache.getline(filename, lineno).strip()))
        # Only samples inside ensure_staged: not the interpreter's start-up or our own set-up.
        if not any(f[0] == "ensure_staged" for f in frames):
            continue
        counts[classify(frames)] += int(count)
    return counts


def layered_costs(archive: Path, fmt: str, reps: int) -> dict[str, float] | None:
    """Deterministic breakdown by subtraction: time reading the archive with kernelprov's own
    pipeline one layer at a time (hash; + decompress; + tar parse; + member validation), each
    without writing anything. Uses engine internals, so it is skipped when they change shape."""
    try:
        from kernelprov.engine import extract as engine
        from kernelprov.engine.tarstream import TarStream
        engine.HashingReader, engine.decompressor, engine._tar_members  # noqa: B018 - probe the API
    except (ImportError, AttributeError):
        return None
    if fmt not in ("tar.zst", "tar.gz", "tar.bz2", "tar.xz", "tar"):
        return None
    size = archive.stat().st_size

    def hashed(raw):
        return engine.HashingReader(raw, size, None)

    def read_hash():
        with open(archive, "rb") as raw:
            hashed(raw).drain()

    def decompress():
        with open(archive, "rb") as raw:
            stream = engine.decompressor(fmt, hashed(raw))
            while stream.read(1 << 20):
                pass

    def parse():
        with open(archive, "rb") as raw:
            for _entry, chunks in TarStream(engine.decompressor(fmt, hashed(raw))).entries():
                for _ in chunks:
                    pass

    def validate():
        with open(archive, "rb") as raw:
            for _member, data in engine._tar_members(engine.decompressor(fmt, hashed(raw)), archive, "/nonexistent"):
                for _ in data or ():
                    pass

    layers = {}
    for name, action in (("read + sha256", read_hash), ("+ decompress", decompress), ("+ tar parse (tarstream)", parse),
                         ("+ member validation (treewriter.py)", validate)):
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        layers[name] = min(times)
    return layers


def child(archive: str, cache_root: str) -> None:
    """The profiled process: one cold ``ensure_staged``; prints its seconds as JSON."""
    from kernelprov.engine.stage import ensure_staged

    staged = ensure_staged(archive, cache_root=cache_root)
    assert staged.extracted
    print(json.dumps({"seconds": staged.seconds, "prefix": str(staged.prefix)}))


def run_child(archive: Path, cache_root: Path, wrapper: list[str]) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run([*wrapper, sys.executable, __file__, "--child", str(archive), str(cache_root)],
                         check=True, capture_output=True, text=True, env=env)
    # py-spy prints its own lines too; ours is the JSON one.
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def strace_counts(argv: list[str]) -> dict[str, int]:
    """System-call counts of ``argv`` and its children (``strace -c -f``)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run(["strace", "-c", "-f", "-o", log.name, *argv], check=True, stdout=subprocess.DEVNULL, env=env)
        counts = {}
        for line in Path(log.name).read_text().splitlines():
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3])
        return counts


def fresh(target: Path, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=tag, dir=target))


def remove(path: Path) -> None:
    subprocess.run(["rm", "-rf", str(path)], check=True)


def timed(argv: list[str]) -> float:
    os.sync()
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


def profile_archive(archive: Path, target: Path, reps: int, rate: int) -> dict:
    from kernelprov.engine.formats import detect_format

    fmt = detect_format(archive)
    result: dict = {"archive": str(archive), "format": fmt, "target": str(target)}
    # 1. Unprofiled wall time.
    walls = []
    for _ in range(reps):
        cache_root = fresh(target, "kpp-")
        os.sync()
        walls.append(run_child(archive, cache_root, [])["seconds"])
        remove(cache_root)
    result["ensure_staged_seconds"] = walls
    layers = layered_costs(archive, fmt, reps)
    if layers is not None:
        result["layers_min_seconds"] = layers
    # 2. Sampled profile.
    cache_root = fresh(target, "kpp-")
    if shutil.which("py-spy"):
        raw = cache_root.parent / f"{cache_root.name}.pyspy.txt"
        seconds = run_child(archive, cache_root / "c", ["py-spy", "record", "--idle", "--rate", str(rate), "--format", "raw",
                                                         "--output", str(raw), "--"])["seconds"]
        counts = parse_pyspy_raw(raw)
        raw.unlink()
        result["profiler"] = f"py-spy --idle --rate {rate}"
    else:
        counts, seconds = cprofile_counts(archive, cache_root / "c")
        result["profiler"] = "cProfile (tottime, inflated by its per-call overhead)"
    result["profiled_seconds"] = seconds
    total = sum(counts.values()) or 1
    result["breakdown"] = {name: {"share": n / total, "seconds": seconds * n / total} for name, n in counts.most_common()}
    staged_prefix = next((cache_root / "c").glob("kernelprov-*/*/"), None)
    # 3. Floors on the same tree, and system-call counts.
    tar_dir = fresh(target, "kpt-")
    flags = GNU_TAR_FLAGS.get(fmt)
    if flags is not None:
        result["gnu_tar_seconds"] = [timed(["tar", *flags, "-xf", str(archive), "-C", str(tar_dir)])]
        for _ in range(reps - 1):
            remove(tar_dir)
            tar_dir.mkdir()
            result["gnu_tar_seconds"].append(timed(["tar", *flags, "-xf", str(archive), "-C", str(tar_dir)]))
        copies = []
        for _ in range(reps):
            copy = target / f"{tar_dir.name}-cp"
            copies.append(timed(["cp", "-a", str(tar_dir), str(copy)]))
            remove(copy)
        result["cp_seconds"] = copies
    if shutil.which("strace"):
        strace_root = fresh(target, "kps-")
        result["syscalls"] = {
            "ensure_staged": strace_counts([sys.executable, __file__, "--child", str(archive), str(strace_root)]),
        }
        if flags is not None:
            untar = fresh(target, "kpu-")
            result["syscalls"]["gnu tar -x"] = strace_counts(["tar", *flags, "-xf", str(archive), "-C", str(untar)])
            result["syscalls"]["cp -a"] = strace_counts(["cp", "-a", str(tar_dir), str(target / f"{tar_dir.name}-cp2")])
            remove(untar)
            remove(target / f"{tar_dir.name}-cp2")
        remove(strace_root)
    if staged_prefix is not None:
        result["tree_entries"] = sum(len(d) + len(f) for _, d, f in os.walk(staged_prefix))
    remove(tar_dir)
    remove(cache_root)
    return result


def cprofile_counts(archive: Path, cache_root: Path) -> tuple[collections.Counter, float]:
    """Fallback: cProfile in this process; tottime per function, classified like py-spy leaves."""
    import cProfile
    import pstats

    from kernelprov.engine.stage import ensure_staged

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(ensure_staged, archive, cache_root=cache_root)
    seconds = time.perf_counter() - started
    counts: collections.Counter = collections.Counter()
    for (filename, line, function), (_cc, _nc, tottime, _ct, _callers) in pstats.Stats(profiler).stats.items():
        source = linecache.getline(filename, line).strip() if filename.startswith("/") else function
        counts[classify([(function, filename, line, source)])] += int(tottime * 1e6)
    return counts, seconds


def print_result(r: dict) -> None:
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"\n== {r['format']}  {r['archive']}  → {r['target']}")
    print(f"  ensure_staged (unprofiled): median {med(r['ensure_staged_seconds']):.2f} s of {r['ensure_staged_seconds']}")
    if "gnu_tar_seconds" in r:
        print(f"  GNU tar -x:                 median {med(r['gnu_tar_seconds']):.2f} s;  cp -a of the tree: median {med(r['cp_seconds']):.2f} s")
    if "layers_min_seconds" in r:
        print("  layered, without writing (min of reps; each row includes the ones above):")
        previous = 0.0
        for name, seconds in r["layers_min_seconds"].items():
            print(f"    {name:<45} {seconds:6.2f} s  (this layer {seconds - previous:5.2f} s)")
            previous = seconds
        rest = min(r["ensure_staged_seconds"]) - previous
        print(f"    {'+ writing the tree, relocation, publish':<45} {min(r['ensure_staged_seconds']):6.2f} s  (this layer {rest:5.2f} s)")
    print(f"  profile ({r['profiler']}), profiled run {r['profiled_seconds']:.2f} s:")
    for name, row in r["breakdown"].items():
        print(f"    {name:<45} {row['seconds']:6.2f} s  {100 * row['share']:5.1f} %")
    if "syscalls" in r:
        names = sorted({n for counts in r["syscalls"].values() for n in counts},
                       key=lambda n: -max(c.get(n, 0) for c in r["syscalls"].values()))[:16]
        print(f"  system calls ({r.get('tree_entries', '?')} entries in the tree):")
        print("    " + f"{'':<16}" + "".join(f"{k:>16}" for k in r["syscalls"]))
        for n in names:
            print("    " + f"{n:<16}" + "".join(f"{c.get(n, 0):>16}" for c in r["syscalls"].values()))
        print("    " + f"{'total':<16}" + "".join(f"{sum(c.values()):>16}" for c in r["syscalls"].values()))


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archives", nargs="+", type=Path)
    parser.add_argument("--target", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    results = []
    for archive in args.archives:
        r = profile_archive(archive.absolute(), args.target.absolute(), args.reps, args.rate)
        print_result(r)
        results.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
