"""Conda-format envs of 25k, 100k and 300k files, and their archives, built once and cached.

Shared by ``scale.py``, ``pack_speed.py`` and ``server_stall.py`` (issue 13). Each size is a real
env — CPython + ipykernel, numpy, pandas, scipy, matplotlib, with ``.pyc`` files, ~23k files, as
``cold_start.py`` builds it — grown to its file count by copies of its own ``site-packages``
packages under distinct names (``site-packages/_kpscale_<n>/<package>/``): real package trees,
where no PyPI stack reaches 100k+ files. The python record is then rewritten so every file,
copies included, is a conda-managed file (as in a real 1,000-package env). Built under
``~/.cache/kernelprov/scale-env/<size>/`` on the disk; archives under
``~/.cache/kernelprov/scale-archives/``, re-packed when the env or ``kernelprov/engine/pack.py``
change. ``--clean`` of the scripts removes both.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kernelprov"
ENV_CACHE = CACHE / "scale-env"
ARCHIVE_CACHE = CACHE / "scale-archives"
PACKAGES = ("ipykernel", "numpy", "pandas", "scipy", "matplotlib")
SIZES = {"25k": 25_000, "100k": 100_000, "300k": 300_000}
_DONE = "kernelprov-scale.json"


def say(text: str = "") -> None:
    print(text, flush=True)


def tree_stats(root: Path) -> tuple[int, int, int]:
    """(regular files, directories + symlinks, bytes) under ``root``."""
    files = others = size = 0
    for directory, dirs, names in os.walk(root):
        others += len(dirs)
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            if os.path.stat.S_ISLNK(st.st_mode):
                others += 1
            else:
                files += 1
                size += st.st_size
    return files, others, size


def scale_env(size: str) -> Path:
    """The prefix of the env of ``size`` ("25k", "100k", "300k"), built on first use."""
    from kernelprov.cli import demo_env

    target = SIZES[size]
    root = ENV_CACHE / size
    prefix = root / "env"
    if (root / _DONE).is_file():
        return prefix
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    say(f"  building the {size} env at {prefix} (pip install {' '.join(PACKAGES)}) ...")
    demo_env.build_conda_env(prefix, packages=PACKAGES, log=lambda line: say(f"    {line}"))
    files, _, _ = tree_stats(prefix)
    site = next((prefix / "lib").glob("python3*/site-packages"))
    packages = sorted(p for p in site.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))
                      and not p.name.startswith("_kpscale_"))
    sizes = {p: tree_stats(p)[0] for p in packages}
    say(f"    {files} files; copying site-packages' {len(packages)} packages ({sum(sizes.values())} files) "
        f"under new names up to {target}")
    copies = 0
    while files < target:
        destination = site / f"_kpscale_{copies:03d}"
        destination.mkdir()
        copies += 1
        for package in packages:
            if files >= target:
                break
            shutil.copytree(package, destination / package.name, symlinks=True)
            files += sizes[package]
    # Every file, copies included, becomes part of the python record, as conda would own them.
    shutil.rmtree(prefix / "conda-meta")
    shutil.rmtree(demo_env.package_cache_dir(prefix))
    base_version = subprocess.run([str(prefix / "bin" / "python"), "-c", "import platform; print(platform.python_version())"],
                                  capture_output=True, text=True, check=True).stdout.strip()
    count, total = demo_env._write_conda_metadata(prefix, base_version)  # noqa: SLF001 - our own builder
    (root / _DONE).write_text(json.dumps({"files": count, "bytes": total, "copies": copies}))
    say(f"    {size} env: {count} files, {total / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s")
    return prefix


@functools.cache
def archive_dir(size: str) -> Path:
    """Where the archives of ``size`` are cached: keyed by the env build and pack.py's source
    (read once per run, so an edit to pack.py during a run cannot split its archives)."""
    import kernelprov.engine.pack

    code = hashlib.sha256(inspect.getsource(kernelprov.engine.pack).encode()).hexdigest()[:8]
    stamp = int((ENV_CACHE / size / _DONE).stat().st_mtime)
    return ARCHIVE_CACHE / f"{size}-{stamp}-pack{code}"


def archives(size: str, prefix: Path, formats=("tar.zst", "tar.gz")) -> dict[str, Path]:
    """``kernelprov pack``'s ``.tar.zst`` and conda-pack's default ``.tar.gz`` of ``size`` — and,
    when ``formats`` names it, ``kernelprov pack --format squashfs``'s image-mode image — packed on
    first use, timings in ``pack-seconds.json`` beside them."""
    out = archive_dir(size)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "pack-seconds.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    wanted = {fmt: out / f"env.{fmt}" for fmt in formats}
    for fmt, path in wanted.items():
        if path.is_file():
            continue
        say(f"  packing {size} {fmt} → {path}")
        started = time.perf_counter()
        if fmt in ("tar.zst", "squashfs"):  # squashfs: image mode's image, relocated to its baked mount point
            subprocess.run([sys.executable, "-m", "kernelprov", "pack", "--env-prefix", str(prefix), "-o", str(path),
                            "--force", "--format", fmt], check=True, stdout=subprocess.DEVNULL)
        else:
            partial = path.with_name(".partial-" + path.name)
            subprocess.run([sys.executable, "-c", "import sys, conda_pack; conda_pack.pack(prefix=sys.argv[1], "
                            "output=sys.argv[2], force=True)", str(prefix), str(partial)], check=True,
                           env=dict(os.environ, TMPDIR=str(out)))
            os.chmod(partial, 0o644)
            os.replace(partial, path)
        timings[fmt] = time.perf_counter() - started
        timings_path.write_text(json.dumps(timings))
    from kernelprov.engine.pack import describe_archive

    for fmt, path in wanted.items():
        if fmt == "tar.gz":  # conda-pack's archive gets its manifest as `install --archive` writes it
            describe_archive(path)  # (kernelprov pack wrote its own: the image's names its mount point)
    return wanted


def clean(size: str) -> None:
    """Remove the env of ``size`` and every cached archive of it."""
    from kernelprov.cli import demo_env

    prefix = ENV_CACHE / size / "env"
    shutil.rmtree(demo_env.package_cache_dir(prefix), ignore_errors=True)
    shutil.rmtree(ENV_CACHE / size, ignore_errors=True)
    for path in ARCHIVE_CACHE.glob(f"{size}-*"):
        shutil.rmtree(path, ignore_errors=True)
