"""What the JupyterLab panel knows and does, as plain Python (no Tornado).

One :class:`KernelprovEnvironments` is made per server by the extension loader
(:mod:`kernelprov.jupyter.serverext`) and handed to the REST handlers in
:mod:`kernelprov.jupyter.routes`. It works over the engine (``manifest``, ``inventory``,
``stage``) and the kernelspecs: it describes each kernelprov kernel without decompressing
anything, and runs pre-warm stages in background threads whose progress the handlers report.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traitlets import List, Set, TraitError, Unicode
from traitlets.config import LoggingConfigurable

from ..config import KernelprovConfig
from ..engine import inventory, stage
from ..engine.formats import detect_format
from ..engine.archive import not_a_conda_env
from ..engine.manifest import read_manifest
from ..errors import ArchiveError, CacheError, KernelprovError
from .kernelspecs import KernelprovKernel, find_kernels

#: Keys a kernel's ``kernel_provisioner.config`` may hold (the provisioner's own settings).
_PROVISIONER_KEYS = ("archive",)


@dataclass
class PrewarmJob:
    """One background stage started from the panel; its fields are written by the staging thread."""

    archive: Path
    cache_dir: str
    started_at: float = field(default_factory=time.time)
    done: int = 0
    total: int = 0
    error: str | None = None
    finished: bool = False

    def report(self, done: int, total: int) -> None:
        """Progress callback for :func:`kernelprov.engine.stage.ensure_staged` (compressed bytes read)."""
        self.done, self.total = done, total

    def as_dict(self) -> dict[str, Any]:
        """The JSON the panel shows as "staging 37 %" or as the error that ended the stage."""
        return {
            "done": self.done,
            "total": self.total,
            "fraction": min(self.done / self.total, 1.0) if self.total else None,
            "started_at": self.started_at,
            "error": self.error,
        }


class KernelprovEnvironments(KernelprovConfig):
    """Every kernelprov kernel this server can start, described for the panel, plus pre-warm jobs.

    Made once per server by :func:`kernelprov.jupyter.serverext._load_jupyter_server_extension` with the server app as parent,
    so ``c.KernelprovConfig.cache_dir`` (and the other :class:`KernelprovConfig` settings) in
    ``jupyter_server_config`` apply. A kernel's own ``kernel_provisioner.config`` overrides them for
    that kernel, exactly as it does for the provisioner. Every method may block on the filesystem
    (kernel dirs and archives live on shared storage): the handlers call them in worker threads.
    """

    kernel_dirs = List(
        Unicode(),
        help="""Kernel directories searched besides the Jupyter path: the server's
        KernelSpecManager's, so the panel sees every kernel the server can start.""",
    )

    allowed_kernelspecs = Set(
        Unicode(),
        help="""The server's KernelSpecManager.allowed_kernelspecs: when not empty, the panel lists
        (and pre-warms) only these kernels, as the launcher does.""",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._jobs: dict[tuple[str, str], PrewarmJob] = {}
        self._jobs_lock = threading.Lock()

    def _kernels(self) -> list[KernelprovKernel]:
        """The kernelprov kernels this server offers (its allowed_kernelspecs applied)."""
        return [k for k in find_kernels(self.kernel_dirs) if not self.allowed_kernelspecs or k.name in self.allowed_kernelspecs]

    def find(self, name: str) -> KernelprovKernel | None:
        """The kernelprov kernel called ``name`` (a name already validated), or None."""
        for kernel in self._kernels():
            if kernel.name == name:
                return kernel
        return None

    def describe_all(self) -> list[dict[str, Any]]:
        """Called by ``GET /kernelprov/envs``: every kernelprov kernel, sorted by name."""
        return [self.describe(kernel) for kernel in self._kernels()]

    def describe(self, kernel: KernelprovKernel) -> dict[str, Any]:
        """One kernel as the panel shows it: archive facts from its manifest (never from the archive
        itself), its staged copy on this node, a running pre-warm, and what stops it from working."""
        problems: list[str] = []
        settings = self._settings_for(kernel, problems)
        info: dict[str, Any] = {
            "name": kernel.name,
            "display_name": kernel.display_name,
            "language": kernel.language,
            "archive": str(kernel.archive) if kernel.archive else None,
            "archive_size": None,
            "format": None,
            "python_version": None,
            "packages": None,
            "staged": None,
            "staging": None,
            "problems": problems,
        }
        archive = kernel.archive
        if archive is None:
            problems.append("Its kernel.json names no archive; reinstall it with `kernelprov install`.")
            return info
        try:
            info["archive_size"] = os.stat(archive).st_size
        except FileNotFoundError:
            problems.append(f"The archive {archive} does not exist; reinstall the kernel or restore the archive.")
        except OSError as err:
            problems.append(f"The archive {archive} cannot be read: {err.strerror}.")
        else:
            if not os.access(archive, os.R_OK):
                problems.append(f"The archive {archive} is not readable by you; ask its owner to make it readable.")
        try:
            manifest = read_manifest(archive)
        except ArchiveError as err:
            problems.append(str(err))
            manifest = None
        if manifest is not None:
            info.update(format=manifest.format, python_version=manifest.python_version, packages=manifest.packages)
            if manifest.conda_env is False:
                problems.append(str(not_a_conda_env(archive)))
            if info["archive_size"] is None:
                info["archive_size"] = manifest.size
        elif info["archive_size"] is not None:
            try:  # no manifest: the archive's first bytes, never its file name, say what it is
                info["format"] = detect_format(archive)
            except ArchiveError as err:
                problems.append(str(err))
        if settings is None:
            return info
        try:
            entry = inventory.find_staged(archive, cache_root=settings.cache_dir)
        except KernelprovError as err:
            problems.append(str(err))
            entry = None
        if entry is not None:
            info["staged"] = {
                "prefix": str(entry.prefix),
                "bytes": entry.env_bytes,
                "staged_at": entry.staged_at,
                "last_used": entry.last_used,
                "in_use": entry.in_use,
            }
        job = self._job(archive, settings.cache_dir)
        if job is not None and (entry is None or job.error):
            info["staging"] = job.as_dict()
        elif entry is None:
            started = inventory.staging_in_progress(archive, cache_root=settings.cache_dir)
            if started is not None:  # a kernel start or a job prologue is unpacking it
                info["staging"] = {"done": 0, "total": 0, "fraction": None, "started_at": started, "error": None}
        return info

    def start_staging(self, kernel: KernelprovKernel) -> PrewarmJob:
        """Called by ``POST /kernelprov/envs/<name>/stage``: stage the kernel's env in a background
        thread (a no-op when it is staged already) and return the job whose progress GET reports.

        A second request while one runs returns the running job. Raises
        :class:`~kernelprov.errors.KernelprovError` when the kernel cannot be staged at all.
        """
        problems: list[str] = []
        settings = self._settings_for(kernel, problems)
        if kernel.archive is None or settings is None:
            raise ArchiveError(problems[0] if problems else "Its kernel.json names no archive; reinstall it with `kernelprov install`.")
        if not kernel.archive.is_file():
            raise ArchiveError(f"The archive {kernel.archive} does not exist; reinstall the kernel or restore the archive.")
        key = (str(kernel.archive), settings.cache_dir)
        with self._jobs_lock:
            job = self._jobs.get(key)
            if job is not None and not job.finished:
                return job
            job = self._jobs[key] = PrewarmJob(kernel.archive, settings.cache_dir)
        # A daemon thread, not the event loop's executor: a server shutting down mid-stage must not
        # wait for it, and a killed stage leaves nothing that a later one trusts.
        thread = threading.Thread(target=self._stage, args=(job, settings, key), name=f"kernelprov-stage-{kernel.name}", daemon=True)
        thread.start()
        return job

    def _stage(self, job: PrewarmJob, settings: KernelprovConfig, key: tuple[str, str]) -> None:
        try:
            staged = stage.ensure_staged(job.archive, progress=job.report, **settings.stage_options())
        except KernelprovError as err:
            self.log.warning("kernelprov: pre-warm of %s failed: %s", job.archive, err)
            job.error = str(err)
        except Exception as err:  # a thread has nobody to raise to: log it and show it in the panel
            self.log.exception("kernelprov: pre-warm of %s failed unexpectedly", job.archive)
            job.error = f"Staging failed unexpectedly: {err!r}; see the server log."
        else:
            self.log.info("kernelprov: pre-warmed %s at %s in %.1f s", job.archive, staged.prefix, staged.seconds)
        job.finished = True
        if job.error is None:
            with self._jobs_lock:
                if self._jobs.get(key) is job:
                    del self._jobs[key]

    def evict(self, kernel: KernelprovKernel) -> Any:
        """Called by ``DELETE /kernelprov/envs/<name>/stage``: remove the staged copy on this node.

        Returns the evicted :class:`~kernelprov.engine.cache.CacheEntry`, or None when nothing is staged.
        Raises :class:`~kernelprov.errors.CacheError` while kernels use it or it is being staged.
        """
        problems: list[str] = []
        settings = self._settings_for(kernel, problems)
        if kernel.archive is None or settings is None:
            return None
        if inventory.find_staged(kernel.archive, cache_root=settings.cache_dir) is None:
            return None
        job = self._job(kernel.archive, settings.cache_dir)
        if job is not None and not job.finished:
            raise CacheError(f"{kernel.name} is being staged right now; evict it once that has finished.")
        return inventory.evict(kernel.archive, cache_root=settings.cache_dir)

    def _job(self, archive: Path, cache_dir: str) -> PrewarmJob | None:
        with self._jobs_lock:
            return self._jobs.get((str(archive), cache_dir))

    def _settings_for(self, kernel: KernelprovKernel, problems: list[str]) -> KernelprovConfig | None:
        """This server's settings overridden by the kernel's provisioner config, as the provisioner
        sees them; None (and a problem) when that config is invalid."""
        allowed = KernelprovConfig.class_trait_names(config=True)
        values = {name: getattr(self, name) for name in allowed}
        for key, value in kernel.provisioner_config.items():
            if key in allowed:
                values[key] = value
            elif key not in _PROVISIONER_KEYS:
                problems.append(f"Its kernel_provisioner config has an unknown setting {key!r}; remove it from kernel.json.")
        try:
            return KernelprovConfig(parent=self, **values)
        except TraitError as err:
            problems.append(f"Its kernel_provisioner config is invalid: {err}")
            return None
