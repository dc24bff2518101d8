#!/usr/bin/env python
"""Cold-start benchmark for kernelprov (issue 4): archive → ``kernel_info`` reply, side by side.

Run it with the dev venv's python (``kernelprov`` must be importable; whatever engine is installed
at run time is the one measured, so re-running after an engine change shows the gain)::

    python benchmarks/cold_start.py --target /dev/shm --target /var/tmp --reps 3

It builds (once, cached) a realistic conda-format env — CPython, ipykernel, numpy, pandas, scipy,
matplotlib: ~23,000 files, ~600 MB — packs it with conda-pack in each format (cached too), installs
one kernelprov kernel per archive into a scratch Jupyter dir, and then for every ``--target`` disk
measures, round-robin over ``--reps`` repetitions, and reports medians of:

* **manual**: GNU ``tar -xzf env.tar.gz -C dir`` + ``dir/bin/python dir/bin/conda-unpack`` + a
  kernel started from ``dir`` (through ``jupyter_client``, until its ``kernel_info`` reply);
* **floors**: ``cp -a`` of the unpacked env on the same disk, GNU ``tar -x`` of the other formats,
  a plain kernel start from the unpacked env, and (once, target-independent) raw decompression of
  every archive to /dev/null with the command-line tools and with the libraries kernelprov uses;
* **kernelprov cold** (fresh ``KERNELPROV_CACHE_DIR`` per repetition) for each format, and
  **kernelprov warm** (cache hit) right after it, twice, each warm start followed by a plain start
  (so the warm target compares starts made side by side); formats the engine cannot unpack are
  recorded as unsupported with its error message;
* **eight concurrent cold starts** of the default-format archive in one event loop (like one
  Jupyter server asked for eight kernels), with the number of extractions;
* a **reference image mode** when ``squashfuse`` exists: copy a squashfs image (packed with
  ``--dest-prefix`` at a fixed mount path) to the target, mount it, start a kernel from it;
* **local-disk proof**: ``strace -f -y -e trace=%file`` around a kernelprov kernel's start plus
  ``import numpy, pandas``, with every file-system call sorted into categories.

It prints a table and the issue's ratios with PASS/FAIL, and writes ``results-<stamp>.json`` and
``results-<stamp>.png`` to ``--out`` (default ``benchmarks/results/``). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
PACKAGES = ("ipykernel", "numpy", "pandas", "scipy", "matplotlib")
DEFAULT_FORMATS = ("tar.zst", "tar.gz", "tar", "zip", "squashfs")
KNOWN_FORMATS = DEFAULT_FORMATS + ("tar.bz2",)
SUFFIXES = {"tar.zst": ".tar.zst", "tar.gz": ".tar.gz", "tar.bz2": ".tar.bz2", "tar": ".tar", "zip": ".zip",
            "squashfs": ".squashfs"}
#: GNU tar's flags per format, for the "tar -x" floors (tar.gz is the manual recipe's own step).
GNU_TAR = {"tar.zst": ["-I", "zstd"], "tar": [], "tar.bz2": ["-j"]}
#: Where the reference squashfs image is mounted; it is packed with this as its --dest-prefix.
IMAGE_MOUNT = "/tmp/kernelprov-bench-image"
CONCURRENT = 8
#: Warm starts per cold start, each followed by a plain start (the warm target compares the two).
WARM_PAIRS = 2
KERNEL_TIMEOUT = 300.0


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Measurement:
    """Samples (seconds) of one timed thing on one target, with optional per-step parts."""

    label: str
    group: str  # "manual", "floor", "kernelprov cold", "kernelprov warm", "concurrent", "reference"
    samples: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    background: list[float] = field(default_factory=list)  # busy CPUs of other processes just before
    create_micros: list[float] = field(default_factory=list)  # the target's file-creation probe just before
    extra: dict = field(default_factory=dict)

    def add(self, seconds: float, parts: dict[str, float] | None = None, background: float | None = None,
            create_micros: float | None = None) -> None:
        self.samples.append(seconds)
        for name, value in (parts or {}).items():
            self.parts.setdefault(name, []).append(value)
        if background is not None:
            self.background.append(background)
        if create_micros is not None:
            self.create_micros.append(create_micros)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def as_json(self) -> dict:
        return {
            "label": self.label, "group": self.group, "samples": self.samples, "median": self.median,
            "min": min(self.samples) if self.samples else None, "max": max(self.samples) if self.samples else None,
            "parts": {name: {"samples": values, "median": statistics.median(values)} for name, values in self.parts.items()},
            "background_busy_cpus": self.background,
            "create_probe_us_per_file": self.create_micros,
            **self.extra,
        }


class Results:
    """All measurements of one target, keyed by a short id."""

    def __init__(self, target: Path, fstype: str):
        self.target = target
        self.fstype = fstype
        self.items: dict[str, Measurement] = {}
        self.unsupported: dict[str, str] = {}
        self.notes: dict[str, object] = {}

    def get(self, key: str, label: str, group: str) -> Measurement:
        if key not in self.items:
            self.items[key] = Measurement(label, group)
        return self.items[key]

    def median(self, key: str) -> float | None:
        item = self.items.get(key)
        return item.median if item else None


# ---------------------------------------------------------------------------------------------
# Set-up: env, archives, scratch Jupyter dir, kernelspecs


def build_env(cache_dir: Path) -> Path:
    from kernelprov.cli.demo_env import cached_conda_env

    started = time.perf_counter()
    prefix = cached_conda_env(cache_dir, packages=PACKAGES, log=lambda line: say(f"    {line}"))
    say(f"  env {prefix} ready in {time.perf_counter() - started:.1f} s")
    return prefix


def tree_stats(root: Path) -> tuple[int, int, int]:
    """(files, directories + symlinks, bytes) under ``root``."""
    files = others = size = 0
    for directory, dirs, names in os.walk(root):
        others += len(dirs)
        for name in names:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                others += 1
            else:
                files += 1
                size += os.lstat(path).st_size
    return files, others, size


def archive_cache_dir(prefix: Path, archive_dir: Path) -> Path:
    """Where this env's archives are cached: re-packed when the env, conda-pack or kernelprov's
    packing code (pack.py, which decides e.g. the squashfs dest prefix and the manifest) change."""
    import inspect

    import conda_pack

    import kernelprov.engine.pack

    code = hashlib.sha256(inspect.getsource(kernelprov.engine.pack).encode()).hexdigest()[:8]
    # The env's build dir name is unique per build: a rebuilt env never reuses stale archives.
    return archive_dir / f"{prefix.parent.name}-cp{conda_pack.__version__}-pack{code}"


def pack_archive(prefix: Path, path: Path, fmt: str, *, dest_prefix: str | None = None) -> float | None:
    """Pack ``prefix`` into ``path`` unless it is there already; return the seconds it took.

    kernelprov's formats go through :func:`kernelprov.engine.pack.pack_env` (which writes the manifest
    kernels verify against, and for squashfs bakes in the mount point under
    ``$KERNELPROV_IMAGE_ROOT``); a format it refuses is packed with conda-pack directly, so that
    the engine's reaction to it gets measured. ``dest_prefix`` packs the reference image.
    """
    import conda_pack

    from kernelprov.engine.pack import PACK_FORMATS
    from kernelprov.engine.pack import pack_env

    if path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    say(f"  packing {fmt} → {path}")
    started = time.perf_counter()
    if fmt in PACK_FORMATS and dest_prefix is None:
        pack_env(path, prefix=prefix, fmt=fmt, force=True)
    else:
        tmp = path.with_name(f".{path.name}.partial")
        try:
            conda_pack.pack(prefix=str(prefix), output=str(tmp), format=fmt, force=True, dest_prefix=dest_prefix,
                            verbose=False)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return time.perf_counter() - started


def pack_archives(prefix: Path, out_dir: Path, formats: list[str]) -> tuple[dict[str, Path], dict[str, str], dict[str, float]]:
    """Pack every format but squashfs (packed per target: its mount point is baked in) and the
    reference image; returns (archives, formats that could not be packed → why, pack seconds)."""
    archives, failed, seconds = {}, {}, {}
    wanted = [(fmt, out_dir / f"env{SUFFIXES[fmt]}", None) for fmt in formats if fmt != "squashfs"]
    if "squashfs" in formats and shutil.which("squashfuse") and shutil.which("mksquashfs"):
        wanted.append(("image", out_dir / "reference-image.squashfs", IMAGE_MOUNT))
    for fmt, path, dest_prefix in wanted:
        try:
            took = pack_archive(prefix, path, "squashfs" if fmt == "image" else fmt, dest_prefix=dest_prefix)
        except Exception as err:  # noqa: BLE001 - a format that cannot be packed is reported, not fatal
            failed[fmt] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            say(f"    could not pack {fmt}: {failed[fmt]}")
            continue
        if took is not None:
            seconds[fmt] = took
        archives[fmt] = path
    return archives, failed, seconds


def image_root_for(target: Path) -> Path:
    """KERNELPROV_IMAGE_ROOT while benchmarking ``target``: images are copied and mounted there."""
    return target / "kernelprov-bench-images"


def pack_squashfs_for(prefix: Path, out_dir: Path, target: Path) -> Path:
    """The squashfs archive for ``target``: ``kernelprov pack`` bakes the mount point under the image root."""
    root = image_root_for(target)
    path = out_dir / f"squashfs-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}" / "env.squashfs"
    os.environ["KERNELPROV_IMAGE_ROOT"] = str(root)
    pack_archive(prefix, path, "squashfs")
    return path


def isolate_jupyter(scratch: Path) -> None:
    """Point every Jupyter/IPython path at ``scratch`` and make kernels write bytecode like real ones."""
    for name in ("data", "config", "runtime", "ipython", "work"):
        (scratch / name).mkdir(parents=True, exist_ok=True)
    os.environ.update(
        JUPYTER_DATA_DIR=str(scratch / "data"), JUPYTER_PATH=str(scratch / "data"),
        JUPYTER_CONFIG_DIR=str(scratch / "config"), JUPYTER_RUNTIME_DIR=str(scratch / "runtime"),
        IPYTHONDIR=str(scratch / "ipython"), JUPYTER_PLATFORM_DIRS="1",
    )
    # This machine sets PYTHONDONTWRITEBYTECODE=1; real users' kernels do not run like that.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def kernel_name(fmt: str) -> str:
    return "bench-" + fmt.replace(".", "-")


def install_kernel(name: str, archive: Path) -> str:
    """``kernelprov install NAME --archive A`` into the scratch Jupyter dir (the real CLI, in-process)."""
    from kernelprov.cli.app import main as kernelprov_main

    if kernelprov_main(["install", name, "--archive", str(archive), "--replace", "--display-name", name]) != 0:
        raise SystemExit(f"kernelprov install {name} --archive {archive} failed")
    return name


def kernels_dir() -> Path:
    return Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels"


def write_plain_spec(name: str, prefix: Path) -> str:
    """A kernelspec that starts ipykernel straight from an unpacked ``prefix`` (no kernelprov)."""
    spec_dir = kernels_dir() / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [str(prefix / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": name, "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return name


def plain_env(prefix: Path) -> dict[str, str]:
    """What ``source prefix/bin/activate`` would set, for the plain and manual kernels."""
    env = dict(os.environ)
    env.update(PATH=f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}", CONDA_PREFIX=str(prefix))
    return env


def write_strace_spec(base_kernel: str, log_path: Path) -> str:
    """A copy of kernelprov kernel ``base_kernel`` whose argv runs run.sh under strace.

    The provisioner (and so the staging) stays in this process; only the kernel — run.sh, its
    ``source activate`` and ipykernel — is traced, which is what runs from the staged env.
    """
    spec = json.loads((kernels_dir() / base_kernel / "kernel.json").read_text())
    spec["argv"] = ["/usr/bin/strace", "-f", "-y", "-qq", "-e", "trace=%file", "-o", str(log_path), *spec["argv"]]
    name = base_kernel + "-strace"
    spec_dir = kernels_dir() / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return name


# ---------------------------------------------------------------------------------------------
# Kernels through jupyter_client


@dataclass
class KernelStart:
    seconds: float
    staged: object | None  # kernelprov's StagedEnv when a kernelprov kernel was started


async def start_kernel(name: str, *, env: dict[str, str] | None = None, code: str | None = None,
                       graceful: bool = False) -> KernelStart:
    """Start kernel ``name``, time it until the kernel_info reply, optionally run ``code``, stop it."""
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=name)
    log = open(Path(os.environ["JUPYTER_RUNTIME_DIR"]) / "kernels.log", "ab")
    started = time.perf_counter()
    client = None
    try:
        kwargs = {"stdout": log, "stderr": log, "cwd": os.environ["JUPYTER_RUNTIME_DIR"]}
        if env is not None:
            kwargs["env"] = env
        await km.start_kernel(**kwargs)
        client = km.client()
        client.start_channels()
        await client.wait_for_ready(timeout=KERNEL_TIMEOUT)
        seconds = time.perf_counter() - started
        if code:
            reply = await client.execute_interactive(code, timeout=KERNEL_TIMEOUT, output_hook=lambda msg: None)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"{code!r} failed in kernel {name}: {reply['content']}")
        return KernelStart(seconds, getattr(km.provisioner, "staged_env", None))
    finally:
        if client is not None:
            client.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=not graceful)
        log.close()


async def start_many(name: str, count: int, env: dict[str, str] | None = None) -> tuple[float, list[KernelStart]]:
    """Start ``count`` kernels of ``name`` at once; (seconds until all replied, each start)."""
    started = time.perf_counter()
    starts = await asyncio.gather(*(start_kernel(name, env=env) for _ in range(count)))
    return time.perf_counter() - started, list(starts)


# ---------------------------------------------------------------------------------------------
# Steps


def run(argv: list[str], **kwargs) -> float:
    """Run a command to completion (failing loudly) and return its wall time."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, **kwargs)
    return time.perf_counter() - started


def remove_tree(path: Path) -> None:
    """Delete a tree quickly (GNU rm), also one left read-only; never timed."""
    if os.path.lexists(path):
        subprocess.run(["chmod", "-R", "u+rwX", str(path)], check=False, stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", str(path)], check=True)


def busy_cpus(interval: float = 0.25) -> float:
    """CPUs kept busy by other processes over ``interval`` (we sleep meanwhile), from /proc/stat."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values[:8]) - idle, sum(values[:8])

    busy0, total0 = sample()
    time.sleep(interval)
    busy1, total1 = sample()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def settle(wait_idle: float = 0.0, threshold: float = 0.3) -> float:
    """Flush the previous step's dirty pages (so its writeback does not bill the next step), then
    measure — and with ``wait_idle``, wait up to that long for — other processes' CPU load."""
    os.sync()
    deadline = time.monotonic() + wait_idle
    busy = busy_cpus()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = busy_cpus()
    return busy


def create_probe(directory: Path, files: int = 500) -> float:
    """Microseconds per file to create ``files`` empty files in a new dir under ``directory``.

    Disk-backed file systems create files far more slowly for a while after a large deletion
    (ext4 on this machine: ~20 µs per file when settled, ~230 µs for about 10 s after deleting a
    25,000-file tree), so the benchmark waits for this to recover and records it with each sample.
    The probe's files are left for the caller to delete later: deleting them now would slow the
    very next probe.
    """
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=directory))
    started = time.perf_counter()
    for i in range(files):
        os.close(os.open(probe / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return 1e6 * (time.perf_counter() - started) / files


def filesystem_type(path: Path) -> str:
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _dev, mount_point, kind = line.split()[:3]
            mount_point = mount_point.replace("\\040", " ")
            if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(best):
                best, fstype = mount_point, kind
    return fstype


def decompression_floors(archives: dict[str, Path], reps: int) -> dict[str, Measurement]:
    """Raw decompression of each archive to /dev/null, with CLI tools and with kernelprov's libraries."""
    floors: dict[str, Measurement] = {}

    def measure(key: str, label: str, action: Callable[[], None]) -> None:
        item = floors.setdefault(key, Measurement(label, "decompression"))
        started = time.perf_counter()
        action()
        item.add(time.perf_counter() - started)

    def cli(argv: list[str]) -> Callable[[], None]:
        def action() -> None:
            with open(os.devnull, "wb") as sink:
                subprocess.run(argv, check=True, stdout=sink)
        return action

    def library(opener: Callable[[object], object], path: Path) -> Callable[[], None]:
        def action() -> None:
            with open(path, "rb") as raw:
                stream = opener(raw)
                while stream.read(1 << 20):
                    pass
        return action

    def zip_members(path: Path) -> Callable[[], None]:
        def action() -> None:
            import zipfile

            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    with zf.open(info) as member:
                        while member.read(1 << 20):
                            pass
        return action

    plans: list[tuple[str, str, Callable[[], None]]] = []
    for fmt, path in archives.items():
        if fmt == "tar.zst":
            import zstandard

            plans += [("zstd-cli", "zstd -dc (tar.zst)", cli(["zstd", "-qdc", str(path)])),
                      ("zstd-lib", "python zstandard (tar.zst)",
                       library(lambda raw: zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), path))]
        elif fmt == "tar.gz":
            import gzip

            plans += [("gzip-cli", "gzip -dc (tar.gz)", cli(["gzip", "-dc", str(path)])),
                      ("gzip-lib", "python gzip/zlib (tar.gz)", library(lambda raw: gzip.GzipFile(fileobj=raw), path))]
            if shutil.which("pigz"):
                plans.append(("pigz-cli", "pigz -dc (tar.gz)", cli(["pigz", "-dc", str(path)])))
            try:
                from isal import igzip

                plans.append(("isal-lib", "python isal igzip (tar.gz)", library(lambda raw: igzip.GzipFile(fileobj=raw), path)))
            except ImportError:
                pass
        elif fmt == "tar.bz2":
            import bz2

            plans += [("bzip2-cli", "bzip2 -dc (tar.bz2)", cli(["bzip2", "-dc", str(path)])),
                      ("bz2-lib", "python bz2 (tar.bz2)", library(lambda raw: bz2.BZ2File(raw), path))]
        elif fmt == "tar":
            plans.append(("tar-read", "read .tar (no compression)", library(lambda raw: raw, path)))
        elif fmt == "zip":
            plans.append(("zip-lib", "python zipfile, every member (zip)", zip_members(path)))
            if shutil.which("unzip"):
                plans.append(("unzip-cli", "unzip -p (zip)", cli(["unzip", "-qq", "-p", str(path)])))
    for _ in range(reps):
        for key, label, action in plans:
            measure(key, label, action)
    return floors


class TargetRun:
    """Every measurement on one target disk, round-robin over the repetitions."""

    def __init__(self, target: Path, archives: dict[str, Path], kernels: dict[str, str], default_format: str,
                 reps: int, concurrent: int, original_prefix: Path, do_strace: bool, wait_idle: float = 0.0,
                 fs_settle: float = 90.0):
        self.root = Path(tempfile.mkdtemp(prefix="kpb-", dir=target))  # short: prefixes must fit
        self.results = Results(target, filesystem_type(target))
        # Trees are moved here after each step and deleted once per repetition: a deletion slows
        # the next file creations on a disk for a while (see create_probe).
        self.trash = self.root / "trash"
        self.trash.mkdir()
        self.disk = self.results.fstype not in ("tmpfs", "ramfs")
        self.fs_settle = fs_settle
        self.fs_floor: float | None = None
        self.create_micros: float | None = None
        self.archives = archives
        self.kernels = kernels
        self.default_format = default_format
        self.baseline: Path | None = None
        self.reps = reps
        self.concurrent = concurrent
        self.original_prefix = original_prefix
        self.do_strace = do_strace
        self.wait_idle = wait_idle
        self.counter = 0
        self.background = 0.0

    def fresh(self, tag: str, create: bool = True) -> Path:
        self.counter += 1
        path = self.root / f"{tag}{self.counter}"
        if create:
            path.mkdir()
        return path

    def settle(self) -> None:
        """Before a timed step: flush, wait for the disk to create files at its settled speed
        (up to --fs-settle seconds), note the background CPU load and the creation speed."""
        self.background = settle(self.wait_idle)
        if not self.disk:
            return
        probe = create_probe(self.trash)
        if self.fs_floor is None:
            self.fs_floor = min([probe] + [create_probe(self.trash) for _ in range(2)])
        deadline = time.monotonic() + self.fs_settle
        while probe > max(2 * self.fs_floor, self.fs_floor + 15) and time.monotonic() < deadline:
            time.sleep(3.0)
            probe = create_probe(self.trash)
        self.fs_floor = min(self.fs_floor, probe)
        self.create_micros = probe

    def record(self, key: str, label: str, group: str, seconds: float, parts: dict[str, float] | None = None) -> Measurement:
        item = self.results.get(key, label, group)
        item.add(seconds, parts, self.background, self.create_micros)
        return item

    def discard(self, path: Path) -> None:
        """Drop a measured tree, never timed. On a disk it is set aside (a rename) and deleted at the
        end of the repetition: deletions slow later file creation there for minutes. On tmpfs it is
        deleted at once: keeping a repetition's ~10 trees (6 GB) in RAM made each step land on
        memory the VM had never touched, whose first-touch faults slowed the later steps by up to
        1.9x (the 8 concurrent starts, always last, most of all)."""
        if not os.path.lexists(path):
            return
        if self.results.fstype == "tmpfs":
            remove_tree(path)
        else:
            os.rename(path, self.trash / path.name)

    def empty_trash(self) -> None:
        remove_tree(self.trash)
        self.trash.mkdir()

    def supported(self, fmt: str) -> bool:
        return fmt in self.kernels and fmt not in self.results.unsupported

    async def go(self) -> Results:
        r = self.results
        say(f"\n== target {r.target} ({r.fstype}); scratch {self.root}")
        try:
            baseline = self.baseline = await self.prepare_baseline()
            for rep in range(self.reps):
                say(f"  -- repetition {rep + 1}/{self.reps}")
                await self.attempt("manual", self.manual())
                await self.attempt("plain", self.plain(baseline))
                await self.attempt("cp", self.copy_floor(baseline))
                await self.attempt("concurrent plain", self.concurrent_plain(baseline))
                await self.attempt("gnu tar", self.gnu_tar_floors())
                for fmt in self.kernels:
                    if self.supported(fmt):
                        await self.attempt(f"kernelprov {fmt}", self.kernelprov_cold_and_warm(fmt))
                if self.supported(self.default_format):
                    await self.attempt("concurrent", self.concurrent_cold())
                await self.attempt("image reference", self.image_reference())
                self.empty_trash()
            if self.do_strace and self.supported(self.default_format) and shutil.which("strace"):
                await self.attempt("strace", self.local_disk_proof())
        finally:
            remove_tree(self.root)
        return r

    async def attempt(self, what: str, step) -> None:
        """Run one measurement; a failure (a kernel that died, a full disk) is recorded, not fatal."""
        try:
            await step
        except Exception as err:  # noqa: BLE001 - reported in the table and the JSON, run goes on
            message = f"{what}: {type(err).__name__}: {err}"
            self.results.notes.setdefault("errors", []).append(message)
            say(f"     FAILED {message}")
            for leftover in self.root.glob("[cksi][0-9]*"):
                self.evict(leftover, unmount=True)

    async def prepare_baseline(self) -> Path:
        """An unpacked, relocated env on the target: the plain start's and ``cp -a``'s source."""
        baseline = self.fresh("base")
        subprocess.run(["tar", "-xzf", str(self.archives["tar.gz"]), "-C", str(baseline)], check=True)
        subprocess.run([str(baseline / "bin" / "python"), str(baseline / "bin" / "conda-unpack")], check=True)
        write_plain_spec("bench-plain", baseline)
        # Warm-up: the first kernel start of a process pays for imports on our side, not the kernel's.
        await start_kernel("bench-plain", env=plain_env(baseline))
        return baseline

    async def manual(self) -> None:
        dest = self.fresh("m")
        self.settle()
        untar = run(["tar", "-xzf", str(self.archives["tar.gz"]), "-C", str(dest)])
        unpack = run([str(dest / "bin" / "python"), str(dest / "bin" / "conda-unpack")])
        start = await start_kernel(write_plain_spec("bench-manual", dest), env=plain_env(dest))
        total = untar + unpack + start.seconds
        self.record("manual", "manual: tar -xzf + conda-unpack + kernel", "manual", total,
                    {"tar -xzf": untar, "conda-unpack": unpack, "kernel start": start.seconds})
        say(f"     manual (tar.gz)            {total:7.2f} s  "
            f"(tar {untar:.2f} + conda-unpack {unpack:.2f} + kernel {start.seconds:.2f})")
        self.discard(dest)

    async def plain(self, baseline: Path, quiet: bool = False) -> None:
        self.settle()
        start = await start_kernel("bench-plain", env=plain_env(baseline))
        self.record("plain", "plain kernel start (unpacked env)", "floor", start.seconds)
        if not quiet:
            say(f"     plain kernel start         {start.seconds:7.2f} s")

    async def concurrent_plain(self, baseline: Path) -> None:
        """The floor of the concurrent case: N kernels starting at once on this machine's CPUs."""
        self.settle()
        seconds, _starts = await start_many("bench-plain", self.concurrent, env=plain_env(baseline))
        self.record("concurrent-plain", f"{self.concurrent} concurrent plain kernel starts", "floor", seconds)
        say(f"     {self.concurrent} concurrent plain starts  {seconds:7.2f} s")

    async def copy_floor(self, baseline: Path) -> None:
        dest = self.fresh("cp", create=False)  # cp -a creates it
        self.settle()
        seconds = run(["cp", "-a", str(baseline), str(dest)])
        self.record("cp", "cp -a of the unpacked env", "floor", seconds)
        say(f"     cp -a floor                {seconds:7.2f} s")
        self.discard(dest)

    async def gnu_tar_floors(self) -> None:
        for fmt, flags in GNU_TAR.items():
            if fmt not in self.archives or fmt == "tar.bz2":  # bz2 only as kernelprov cold; it is slow
                continue
            dest = self.fresh("t")
            self.settle()
            seconds = run(["tar", *flags, "-xf", str(self.archives[fmt]), "-C", str(dest)])
            self.record(f"gnu-tar-{fmt}", f"GNU tar -x ({fmt})", "floor", seconds)
            say(f"     GNU tar -x {fmt:<15} {seconds:7.2f} s")
            self.discard(dest)

    def use_fresh_cache(self, tag: str) -> Path:
        cache_dir = self.fresh(tag)
        os.environ["KERNELPROV_CACHE_DIR"] = str(cache_dir)
        return cache_dir

    def evict(self, cache_dir: Path, unmount: bool = False) -> None:
        """Set a used cache dir aside; with ``unmount`` (image mode) first ``kernelprov cache clean``
        until nothing is staged — an image mount can stay busy for a moment after its kernel was
        killed, and the next cold start must find the mount point free. Never timed."""
        if not unmount:
            self.discard(cache_dir)
            return
        env = {**os.environ, "KERNELPROV_CACHE_DIR": str(cache_dir)}
        for _ in range(20):
            subprocess.run([sys.executable, "-m", "kernelprov", "cache", "clean"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            listed = subprocess.run([sys.executable, "-m", "kernelprov", "cache", "list", "--json"],
                                    capture_output=True, text=True, env=env)
            try:
                if not json.loads(listed.stdout or "[]"):
                    break
            except ValueError:
                break
            time.sleep(0.5)
        else:
            say(f"     warning: kernelprov cache clean left staged envs in {cache_dir} or the image root")
        self.discard(cache_dir)

    async def kernelprov_cold_and_warm(self, fmt: str) -> None:
        from kernelprov.errors import KernelprovError

        cache_dir = self.use_fresh_cache("c")
        self.settle()
        try:
            cold = await start_kernel(self.kernels[fmt])
        except KernelprovError as err:
            self.results.unsupported[fmt] = str(err)
            say(f"     kernelprov cold {fmt:<10}  unsupported: {err}")
            self.evict(cache_dir, unmount=True)
            return
        stage = cold.staged.seconds
        if cold.staged.extracted:
            self.record(f"cold-{fmt}", f"kernelprov cold ({fmt})", "kernelprov cold", cold.seconds,
                        {"stage (unpack+relocate)": stage, "kernel start": cold.seconds - stage})
        else:  # a leftover of an earlier repetition was reused: not a cold start, so not counted
            self.results.notes.setdefault("errors", []).append(f"kernelprov {fmt}: a 'cold' start reused a staged env")
        warms = []
        for pair in range(WARM_PAIRS):
            # Warm and plain starts alternate in ABBA order, so that both see the same machine and
            # the same predecessor: a start right after a killed kernel differs by ~50 ms (10 %),
            # more than the 5 % the warm target allows.
            if pair % 2 and self.baseline is not None:
                await self.plain(self.baseline, quiet=True)
            self.settle()
            warm = await start_kernel(self.kernels[fmt])
            self.record(f"warm-{fmt}", f"kernelprov warm ({fmt})", "kernelprov warm", warm.seconds,
                        {"stage check": warm.staged.seconds, "kernel start": warm.seconds - warm.staged.seconds})
            warms.append(warm)
            if not pair % 2 and self.baseline is not None:
                await self.plain(self.baseline, quiet=True)
        say(f"     kernelprov cold {fmt:<10} {cold.seconds:7.2f} s  (stage {stage:.2f}; extracted={cold.staged.extracted}); "
            f"warm {', '.join(f'{w.seconds:.2f}' for w in warms)} s (extracted={any(w.staged.extracted for w in warms)})")
        self.evict(cache_dir, unmount=fmt == "squashfs")

    async def concurrent_cold(self) -> None:
        fmt = self.default_format
        cache_dir = self.use_fresh_cache("k")
        self.settle()
        seconds, starts = await start_many(self.kernels[fmt], self.concurrent)
        extractions = sum(1 for s in starts if s.staged.extracted)
        item = self.record("concurrent", f"{self.concurrent} concurrent kernelprov cold ({fmt})", "concurrent", seconds)
        item.extra.setdefault("extractions", []).append(extractions)
        item.extra.setdefault("each", []).append(sorted(s.seconds for s in starts))
        # The extracting start's stage time; the others' include their wait for its lock.
        item.extra.setdefault("stage_seconds", []).append(max(s.staged.seconds for s in starts if s.staged.extracted))
        say(f"     {self.concurrent} concurrent cold {fmt:<7} {seconds:7.2f} s  (extractions: {extractions})")
        self.evict(cache_dir)

    async def image_reference(self) -> None:
        """cp the squashfs image to the target + squashfuse mount + kernel, by hand: the image mode's floor."""
        image = self.archives.get("image")
        squashfuse = shutil.which("squashfuse_ll") or shutil.which("squashfuse")  # what the engine uses
        if image is None or not squashfuse:
            return
        mount = Path(IMAGE_MOUNT)
        mount.mkdir(exist_ok=True)
        dest = self.fresh("i") / image.name
        self.settle()
        copy = run(["cp", str(image), str(dest)])
        started = time.perf_counter()
        subprocess.run([squashfuse, str(dest), str(mount)], check=True)
        mounted = time.perf_counter() - started
        try:
            start = await start_kernel(write_plain_spec("bench-image", mount), env=plain_env(mount))
        finally:
            subprocess.run(["fusermount3" if shutil.which("fusermount3") else "fusermount", "-u", str(mount)], check=False)
        total = copy + mounted + start.seconds
        self.record("image", "reference: cp image + squashfuse + kernel (by hand)", "reference", total,
                    {"cp image": copy, "squashfuse mount": mounted, "kernel start": start.seconds})
        say(f"     reference image by hand    {total:7.2f} s  (cp {copy:.2f} + mount {mounted:.3f} + kernel {start.seconds:.2f})")
        self.discard(dest.parent)

    async def local_disk_proof(self) -> None:
        fmt = self.default_format
        cache_dir = self.use_fresh_cache("s")
        log_path = self.root / "strace.log"
        name = write_strace_spec(self.kernels[fmt], log_path)
        start = await start_kernel(name, code="import numpy, pandas", graceful=True)
        await asyncio.sleep(0.5)  # let strace finish writing after the kernel exits
        proof = classify_strace(log_path, staged=start.staged.prefix, original=self.original_prefix,
                                archive=self.archives[fmt], scratch=Path(os.environ["JUPYTER_DATA_DIR"]).parent)
        self.results.notes["strace"] = proof
        say(f"     strace: {proof['staged']} of {proof['env_related']} env-related file-system calls on the staged env "
            f"({proof['percent_local']:.3f} %); {proof['total']} calls in all")
        self.evict(cache_dir, unmount=True)


# ---------------------------------------------------------------------------------------------
# strace classification

_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_DIRFD = re.compile(r"^(?P<fd>AT_FDCWD|-?\d+)(?:<(?P<dir>[^>]*)>)?,\s*")
_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"')


def _call_path(args: str, cwd: dict[str, str], pid: str) -> str | None:
    """The path a traced file-system call touched, made absolute from its -y decoded dirfd.

    ``strace -y`` prints ``AT_FDCWD</cwd>`` and ``3</dir>`` for *at calls; for the older calls
    (``mkdir``, ``chdir``, ``stat``) a relative path is resolved against the last cwd seen for
    that process.
    """
    directory = None
    match = _DIRFD.match(args)
    if match:
        directory = match.group("dir")
        if match.group("fd") == "AT_FDCWD" and directory:
            cwd[pid] = directory
        args = args[match.end():]
    string = _STRING.match(args)
    if not string:
        return directory
    path = string.group(1).encode().decode("unicode_escape", "replace")
    if path.startswith("/"):
        return os.path.normpath(path)
    base = directory or cwd.get(pid)
    if base:
        return os.path.normpath(os.path.join(base, path)) if path else base
    return path or None


def classify_strace(log_path: Path, *, staged: Path, original: Path, archive: Path, scratch: Path) -> dict:
    """Sort every traced file-system call by what it touched; return counts and the local share."""
    home = str(Path.home())
    categories: list[tuple[str, list[str]]] = [
        ("staged env (node-local)", sorted({str(staged), os.path.realpath(staged)})),
        ("kernelprov cache dir: leases, markers (node-local)", sorted({str(staged.parent), os.path.realpath(staged.parent)})),
        ("original env (shared-FS stand-in)", sorted({str(original), os.path.realpath(original)})),
        ("archive location", sorted({str(archive.parent), os.path.realpath(archive.parent)})),
        ("kernelspec, Jupyter/IPython scratch dirs", [str(scratch)]),
        ("/proc, /sys, /dev", ["/proc", "/sys", "/dev"]),
        ("/etc", ["/etc"]),
        ("system (/usr, /lib, /bin)", ["/usr", "/lib", "/lib64", "/bin", "/sbin"]),
        ("home (other)", [home]),
        ("/tmp (other)", ["/tmp", "/var/tmp", "/dev/shm"]),
    ]
    counts = {name: 0 for name, _ in categories}
    counts.update({"relative (cwd unknown)": 0, "other": 0})
    cwd: dict[str, str] = {}
    failed = dict.fromkeys(counts, 0)
    by_call: dict[str, dict[str, int]] = {}
    samples: dict[str, list[str]] = {}
    total = 0
    with open(log_path, errors="replace") as log:
        for line in log:
            if "resumed>" in line:
                continue
            match = _CALL.match(line.strip())
            if not match:
                continue
            pid, call, args = match.groups()
            path = _call_path(args, cwd, pid)
            if path is None:
                continue
            total += 1
            if not path.startswith("/"):
                category = "relative (cwd unknown)"
            else:
                category = "other"
                for name, roots in categories:
                    if any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots):
                        category = name
                        break
            counts[category] += 1
            if call in ("chdir", "fchdir") and " = 0" in line and path.startswith("/"):
                cwd[pid] = path
            if re.search(r"= -1 E", line):
                failed[category] += 1
            by_call.setdefault(category, {}).setdefault(call, 0)
            by_call[category][call] += 1
            if category != "staged env (node-local)" and len(samples.setdefault(category, [])) < 5:
                samples[category].append(f"{call} {path}")
    local = counts["staged env (node-local)"]
    remote = counts["original env (shared-FS stand-in)"] + counts["archive location"]
    return {
        "total": total, "staged": local, "env_related": local + remote, "remote": remote,
        "percent_local": 100.0 * local / (local + remote) if local + remote else 0.0,
        "percent_of_all_calls": 100.0 * local / total if total else 0.0,
        "categories": counts, "failed_calls": failed, "by_call": by_call, "examples": samples,
    }


# ---------------------------------------------------------------------------------------------
# Ratios, table, JSON, chart


def ratios(r: Results, default_format: str) -> list[dict]:
    """The issue's targets, computed from this target's medians."""
    m = r.median
    plain, cp, manual = m("plain"), m("cp"), m("manual")
    cold_default = m(f"cold-{default_format}")
    out = []

    def add(name: str, value: float | None, limit: float | None, better: str = "<=", applies: bool = True,
            extra_ok: bool = True, note: str = "") -> None:
        if value is None:
            status = "n/a"
        elif limit is None:
            status = "info"
        elif not applies:
            status = "n/a (tmpfs only)"
        else:
            ok = (value <= limit if better == "<=" else value >= limit) and extra_ok
            status = "PASS" if ok else "FAIL"
        out.append({"ratio": name, "value": value, "target": f"{better} {limit}" if limit is not None else "-",
                    "status": status, "note": note})

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    add(f"warm ({default_format}) / plain kernel start", div(m(f"warm-{default_format}"), plain), 1.05)
    add("cold tar.zst / (cp -a floor + plain)", div(m("cold-tar.zst"), (cp + plain) if cp and plain else None), 1.3)
    add("cold tar.gz / manual", div(m("cold-tar.gz"), manual), 1.0)
    add(f"cold {default_format} (pack default) / manual", div(cold_default, manual), 0.5, applies=r.fstype == "tmpfs")
    item = r.items.get("concurrent")
    extractions = item.extra.get("extractions", []) if item else []
    add(f"{CONCURRENT} concurrent cold / 1 cold ({default_format})", div(m("concurrent"), cold_default), 1.3,
        extra_ok=bool(extractions) and all(e == 1 for e in extractions), note=f"extractions per run: {extractions}")
    stage = statistics.median(r.items[f"cold-{default_format}"].parts["stage (unpack+relocate)"]) \
        if f"cold-{default_format}" in r.items else None
    add(f"{CONCURRENT} concurrent cold / (1 cold stage + {CONCURRENT} concurrent plain)",
        div(m("concurrent"), stage + m("concurrent-plain") if stage is not None and m("concurrent-plain") else None), None,
        note="the concurrent case against its own floor on this many CPUs")
    add("cold squashfs image mode / (cp -a floor + plain)", div(m("cold-squashfs"), (cp + plain) if cp and plain else None), None,
        note="not an issue target: the zero-copy mode's cost")
    add("warm squashfs image mode / plain kernel start", div(m("warm-squashfs"), plain), None,
        note="kernel imports from a FUSE mount")
    proof = r.notes.get("strace")
    add("% env file-system calls on the staged env", proof["percent_local"] if proof else None, 99.9, better=">=",
        note=f"{proof['staged']} of {proof['env_related']}" if proof else "")
    return out


def print_report(target_results: list[Results], decompression: dict[str, Measurement], all_ratios: list[list[dict]]) -> None:
    say("\n" + "=" * 100)
    say("Raw decompression to /dev/null (target-independent; medians)")
    for item in decompression.values():
        say(f"  {item.label:<58} {item.median:8.2f} s")
    for r, rs in zip(target_results, all_ratios):
        reps = max((len(i.samples) for k, i in r.items.items() if k == "cold-tar.zst" or k == "manual"), default=0)
        say(f"\nTarget {r.target} ({r.fstype}) — medians of {reps} reps ({WARM_PAIRS} warm + plain pairs per cold start)")
        say(f"  {'measurement':<58} {'median':>8} {'min':>8} {'max':>8} {'bg cpu':>7} {'µs/file':>8}   parts (medians)")
        for item in r.items.values():
            parts = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in item.parts.items())
            background = statistics.median(item.background) if item.background else float("nan")
            probe = f"{statistics.median(item.create_micros):8.0f}" if item.create_micros else f"{'-':>8}"
            say(f"  {item.label:<58} {item.median:8.2f} {min(item.samples):8.2f} {max(item.samples):8.2f} "
                f"{background:7.2f} {probe}   {parts}")
        for fmt, why in r.unsupported.items():
            say(f"  {'kernelprov cold (' + fmt + ')':<58} {'unsupported':>8}   {why}")
        for error in r.notes.get("errors", []):
            say(f"  error: {error}")
        proof = r.notes.get("strace")
        if proof:
            say("  strace categories: " + ", ".join(f"{k}: {v}" for k, v in proof["categories"].items() if v))
        say(f"  {'ratio':<58} {'value':>8} {'target':>9}   status")
        for row in rs:
            value = "-" if row["value"] is None else f"{row['value']:.3f}"
            say(f"  {row['ratio']:<58} {value:>8} {row['target']:>9}   {row['status']}  {row['note']}")


def draw_chart(path: Path, target_results: list[Results], decompression: dict[str, Measurement]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"manual": "#7f7f7f", "floor": "#1f77b4", "kernelprov cold": "#d62728", "kernelprov warm": "#2ca02c",
               "concurrent": "#9467bd", "reference": "#ff7f0e", "decompression": "#17becf"}
    panels = [(f"{r.target} ({r.fstype})", list(r.items.values()), r.unsupported) for r in target_results]
    panels.append(("raw decompression to /dev/null", list(decompression.values()), {}))
    height = max(len(items) + len(unsup) for _, items, unsup in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.42 * height + 2), squeeze=False)
    for ax, (title, items, unsupported) in zip(axes[0], panels):
        labels = [i.label for i in items] + [f"kernelprov cold ({f}): unsupported" for f in unsupported]
        values = [i.median for i in items] + [0.0] * len(unsupported)
        bars = ax.barh(range(len(labels)), values, color=[colours.get(i.group, "#333") for i in items] + ["#dddddd"] * len(unsupported))
        # Steps inside a bar (e.g. stage vs kernel start) drawn as hatched overlays from the left.
        for y, item in enumerate(items):
            if len(item.parts) > 1:
                first = next(iter(item.parts))
                ax.barh(y, statistics.median(item.parts[first]), color="none", edgecolor="white", hatch="///", linewidth=0)
        for bar, value in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.2f} s" if value else " n/a",
                    va="center", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median); hatched: first step (unpack/stage)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max(values + [0.1]) * 1.25)
    fig.suptitle("kernelprov cold start: archive → kernel_info reply", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def engine_info() -> dict:
    import kernelprov

    source = Path(kernelprov.__file__).resolve().parent
    info = {"kernelprov_version": kernelprov.__version__, "kernelprov_path": str(source)}
    try:
        info["kernelprov_git"] = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty"],
                                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kernelprov"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", type=Path,
                        help="disk to extract/cache on (repeatable; default: $TMPDIR or /tmp)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each measurement (default 5)")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"archive formats, comma-separated, from {', '.join(KNOWN_FORMATS)} (default: all but tar.bz2)")
    parser.add_argument("--env-cache", type=Path, default=cache / "bench-env", help="where the benchmark env is built and cached")
    parser.add_argument("--archive-dir", type=Path, default=cache / "bench-archives",
                        help="where archives are packed and cached (stands in for the shared filesystem)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="directory for the JSON and PNG results")
    parser.add_argument("--concurrent", type=int, default=CONCURRENT, help="kernels started at once (default 8)")
    parser.add_argument("--no-strace", action="store_true", help="skip the local-disk proof")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed step, wait up to SECONDS for other processes to leave the CPUs idle "
                             "(the background load is recorded either way)")
    parser.add_argument("--fs-settle", type=float, default=90.0, metavar="SECONDS",
                        help="on a disk target, before each timed step wait up to SECONDS for file creation to "
                             "recover its settled speed after deletions (default 90)")
    args = parser.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(args.formats) - set(KNOWN_FORMATS)
    if unknown:
        parser.error(f"unknown formats: {', '.join(sorted(unknown))}")
    if "tar.gz" not in args.formats:
        args.formats.insert(0, "tar.gz")  # the manual recipe needs it
    args.target = args.target or [Path(os.environ.get("TMPDIR", "/tmp"))]
    return args


async def main_async(args: argparse.Namespace) -> int:
    global CONCURRENT
    CONCURRENT = args.concurrent
    from kernelprov.engine.pack import DEFAULT_FORMAT

    started = time.perf_counter()
    say("Set-up")
    prefix = build_env(args.env_cache)
    files, others, size = tree_stats(prefix)
    say(f"  env: {files} files + {others} dirs/links, {size / 1e6:.0f} MB")
    out_dir = archive_cache_dir(prefix, args.archive_dir)
    archives, pack_failed, pack_seconds = pack_archives(prefix, out_dir, args.formats)
    targets = [t.absolute() for t in args.target]
    per_target: list[dict[str, Path]] = []
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        mine = dict(archives)
        if "squashfs" in args.formats:
            try:
                mine["squashfs"] = pack_squashfs_for(prefix, out_dir, target)
            except Exception as err:  # noqa: BLE001 - reported as unsupported, not fatal
                pack_failed["squashfs"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                say(f"    could not pack squashfs: {pack_failed['squashfs']}")
        per_target.append(mine)
    for fmt, path in {**archives, **{f"squashfs for {t}": a["squashfs"] for t, a in zip(targets, per_target) if "squashfs" in a}}.items():
        say(f"  archive {fmt:<9} {path.stat().st_size / 1e6:7.1f} MB  {path}")
    scratch = Path(tempfile.mkdtemp(prefix="kernelprov-bench-"))
    isolate_jupyter(scratch)
    target_results: list[Results] = []
    try:
        say("Raw decompression floors")
        decompression = decompression_floors({f: p for f, p in archives.items() if f != "image"}, args.reps)
        for index, (target, mine) in enumerate(zip(targets, per_target)):
            os.environ["KERNELPROV_IMAGE_ROOT"] = str(image_root_for(target))
            kernels = {fmt: install_kernel(kernel_name(fmt) + ("" if fmt != "squashfs" else f"-{index}"), path)
                       for fmt, path in mine.items() if fmt != "image"}
            run_ = TargetRun(target, mine, kernels, DEFAULT_FORMAT, args.reps, args.concurrent, prefix,
                             not args.no_strace, args.wait_idle, args.fs_settle)
            results = await run_.go()
            for fmt, why in pack_failed.items():
                results.unsupported.setdefault(fmt, f"could not pack: {why}")
            target_results.append(results)
    finally:
        kernel_log = scratch / "runtime" / "kernels.log"
        if kernel_log.is_file() and any(r.notes.get("errors") for r in target_results):
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(kernel_log, args.out / f"kernels-{time.strftime('%Y%m%d-%H%M%S')}.log")
        shutil.rmtree(scratch, ignore_errors=True)
    all_ratios = [ratios(r, DEFAULT_FORMAT) for r in target_results]
    print_report(target_results, decompression, all_ratios)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = {
        "benchmark": "kernelprov cold start (issue 4)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds_total": time.perf_counter() - started,
        "reps": args.reps,
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "engine": {**engine_info(), "default_format": DEFAULT_FORMAT},
        "env": {"prefix": str(prefix), "packages": list(PACKAGES), "files": files, "dirs_and_links": others, "bytes": size},
        "archives": {fmt: {"path": str(p), "bytes": p.stat().st_size, "pack_seconds": pack_seconds.get(fmt)}
                     for fmt, p in archives.items()},
        "squashfs_per_target": {str(t): str(a["squashfs"]) for t, a in zip(targets, per_target) if "squashfs" in a},
        "decompression": {k: v.as_json() for k, v in decompression.items()},
        "targets": [{"target": str(r.target), "fstype": r.fstype,
                     "measurements": {k: v.as_json() for k, v in r.items.items()},
                     "unsupported": r.unsupported, "strace": r.notes.get("strace"), "ratios": rs,
                     "errors": r.notes.get("errors", [])}
                    for r, rs in zip(target_results, all_ratios)],
    }
    json_path = args.out / f"results-{stamp}.json"
    json_path.write_text(json.dumps(data, indent=1))
    png_path = args.out / f"results-{stamp}.png"
    draw_chart(png_path, target_results, decompression)
    say(f"\nWrote {json_path} and {png_path} ({time.perf_counter() - started:.0f} s in all)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
