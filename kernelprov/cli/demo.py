"""``kernelprov demo``: the whole journey on a machine with no conda, timed.

Called by the CLI (the README's first set-up command). It builds a small conda-format env from
the running CPython (cached between runs), packs it with conda-pack, installs it as a kernel into
a scratch Jupyter directory (the user's real kernels are not touched), starts it through the
provisioner twice — cold (unpack) and warm (reuse) — runs a cell, and prints where the kernel ran
and how long each start took.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from ..engine.cache import default_cache_root
from ..engine.formats import archive_file_name

DEMO_KERNEL = "kernelprov-demo"
_CELL = "import sys, socket, ipykernel\nprint(f'{socket.gethostname()}: {sys.executable} (ipykernel {ipykernel.__version__})')"


def _say(text: str) -> None:
    print(text, flush=True)


def _demo_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kernelprov"


async def _start_and_run(kernel_name: str) -> tuple[float, str, object]:
    """Start the kernel, wait for its kernel_info reply, run the cell; return (seconds, output, staged)."""
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    started = time.perf_counter()
    await km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=120)
        seconds = time.perf_counter() - started
        output: list[str] = []
        await client.execute_interactive(
            _CELL, timeout=60,
            output_hook=lambda msg: output.append(msg["content"].get("text", "")) if msg["msg_type"] == "stream" else None,
        )
        return seconds, "".join(output).strip(), km.provisioner.staged_env
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=True)


def run_demo_command(args) -> int:
    """``kernelprov demo [--cache-dir DIR]``, called by :func:`kernelprov.cli.app.main`."""
    return run_demo(cache_dir=args.cache_dir)


def run_demo(cache_dir: str | None = None) -> int:
    """Run the demo end to end; return the exit status. ``cache_dir`` overrides the cache root.

    Called by ``kernelprov demo``; a :class:`~kernelprov.errors.KernelprovError` from packing or
    installing propagates to the CLI, which prints it as one line."""
    from ..engine.pack import pack_env
    from ..jupyter.install import install_kernel
    from ..jupyter.kernelspecs import kernels_dir_for
    from .demo_env import cached_conda_env

    home = _demo_home()
    scratch = Path(tempfile.mkdtemp(prefix="kernelprov-demo-"))
    # A fresh cache dir on the node-local root the kernel would really use, so the first start is cold.
    node_cache = Path(tempfile.mkdtemp(prefix="kernelprov-demo-cache-", dir=cache_dir or default_cache_root()))
    os.environ.update(
        JUPYTER_DATA_DIR=str(scratch / "data"), JUPYTER_PATH=str(scratch / "data"),
        JUPYTER_CONFIG_DIR=str(scratch / "config"), KERNELPROV_CACHE_DIR=str(node_cache),
    )
    try:
        _say(f"[1/5] Building a conda-format demo env from {sys.base_prefix} (cached in {home}) ...")
        t = time.perf_counter()
        prefix = cached_conda_env(home / "demo-env", packages=("ipykernel",))
        _say(f"      {prefix} ready in {time.perf_counter() - t:.1f} s")

        archive = scratch / archive_file_name("demo")
        _say(f"[2/5] Packing it with conda-pack into {archive} ...")
        t = time.perf_counter()
        pack_env(archive, prefix=prefix)
        _say(f"      packed in {time.perf_counter() - t:.1f} s")

        _say(f"[3/5] Installing it as kernel {DEMO_KERNEL!r} in a scratch Jupyter dir ({scratch / 'data'}) ...")
        install_kernel(DEMO_KERNEL, kernels_dir_for(), archive=archive, display_name="Python (kernelprov demo)")

        _say(f"[4/5] Cold start through the provisioner (unpacks into {node_cache}) ...")
        cold, output, staged = asyncio.run(_start_and_run(DEMO_KERNEL))
        _say(f"      cell output: {output}")
        _say("[5/5] Warm start (reuses the staged env) ...")
        warm, output_warm, staged_warm = asyncio.run(_start_and_run(DEMO_KERNEL))
        _say(f"      cell output: {output_warm}")

        ran_local = output.split(": ", 1)[-1].startswith(str(staged.prefix))
        _say("")
        _say(f"Kernel ran on {socket.gethostname()} from {staged.prefix}")
        _say(f"  node-local staged copy used: {'yes' if ran_local else 'NO'}; archive: {archive}")
        _say(f"  cold start (unpack + kernel_info): {cold:.2f} s  (unpack alone {staged.seconds:.2f} s)")
        _say(f"  warm start (reuse + kernel_info):  {warm:.2f} s  (stage check {staged_warm.seconds * 1000:.1f} ms)")
        return 0 if ran_local and staged.extracted and not staged_warm.extracted else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(node_cache, ignore_errors=True)
