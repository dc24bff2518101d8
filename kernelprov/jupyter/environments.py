"""What the JupyterLab panel knows and does, as plain Python (no Tornado).

One :class:`KernelprovEnvironments` is made per server by the extension loader
(:mod:`kernelprov.jupyter.serverext`) and handed to the REST handlers in
:mod:`kernelprov.jupyter.routes`. It works over the engine (``manifest``, ``inventory``,
``failures``) and the kernelspecs: it describes each kernelprov kernel without decompressing
anything (files are re-read only when their stat changes, :mod:`.statcache`), and starts the
panel's pre-warm stages (:mod:`.prewarm`, background threads whose progress the handlers report).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from traitlets import List, Set, TraitError, Unicode

from ..config import KernelprovConfig
from ..engine import failures, inventory
from ..engine.archive import not_a_conda_env
from ..engine.formats import detect_format
from ..engine.leases import lease_dir
from ..engine.manifest import manifest_path, read_manifest
from ..errors import ArchiveError, CacheError, KernelprovError, human_size
from .kernelspecs import KernelprovKernel, kernel_from_spec, kernel_spec_manager
from .prewarm import PrewarmJob, PrewarmJobs
from .statcache import StatCache

log = logging.getLogger(__name__)

#: kernel.json files are a few kB; one larger than this is skipped rather than read.
_MAX_KERNEL_JSON_BYTES = 1 << 20

#: Keys a kernel's ``kernel_provisioner.config`` may hold (the provisioner's own settings).
_PROVISIONER_KEYS = ("archive",)


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
        self._prewarm = PrewarmJobs(self.log)
        self._kernel_files = StatCache()
        self._manifests = StatCache()
        self._formats = StatCache()

    def _kernels(self) -> list[KernelprovKernel]:
        """The kernelprov kernels this server offers (its allowed_kernelspecs applied), sorted by
        name. Lists the kernel dirs at every call (new kernels appear at the next poll) but reads
        a kernel.json only when it changed."""
        found = []
        specs = kernel_spec_manager(self.kernel_dirs).find_kernel_specs()
        for name, resource_dir in sorted(specs.items()):
            if self.allowed_kernelspecs and name not in self.allowed_kernelspecs:
                continue
            path = os.path.join(resource_dir, "kernel.json")
            try:
                kernel = self._kernel_files.get(path, lambda p, n=name, d=resource_dir: _read_kernel(n, Path(d), p))
            except OSError:
                continue  # removed between the listing and the stat
            if kernel is not None:
                found.append(kernel)
        return found

    def find(self, name: str) -> KernelprovKernel | None:
        """The kernelprov kernel called ``name`` (a name already validated), or None."""
        for kernel in self._kernels():
            if kernel.name == name:
                return kernel
        return None

    def describe_all(self) -> list[dict[str, Any]]:
        """Called by ``GET /kernelprov/envs``: every kernelprov kernel, those with a problem (or a
        remembered failure) first, then by display name."""
        described = [self.describe(kernel) for kernel in self._kernels()]
        return sorted(described, key=lambda env: (not _has_problem(env), env["display_name"].casefold(), env["name"]))

    def staging_states(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Called by ``GET /kernelprov/staging`` (the panel's fast poll while something stages):
        for each named kernel, its staging progress and whether it is staged now. Reads nothing
        on the shared filesystem but one ``stat`` of each archive."""
        wanted = set(names)
        states = {}
        for kernel in self._kernels():
            if kernel.name not in wanted or kernel.archive is None:
                continue
            settings = self._settings_for(kernel, [])
            if settings is None:
                continue
            try:
                entry = inventory.find_staged(kernel.archive, cache_root=settings.cache_dir)
            except KernelprovError:
                entry = None
            states[kernel.name] = {"staging": self._staging(kernel.archive, settings.cache_dir, entry),
                                   "staged": entry is not None, "slurm_jobs": _slurm_jobs(kernel)}
        return states

    def describe(self, kernel: KernelprovKernel) -> dict[str, Any]:
        """One kernel as the panel shows it: archive facts from its manifest (never from the archive
        itself), its staged copy on this node, a running stage, the last failed one, and what
        stops it from working — checked cheaply (stat, manifest, first bytes) before a start fails."""
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
            "pip_packages": None,
            "staged": None,
            "staging": None,
            "last_failure": None,
            "slurm_jobs": _slurm_jobs(kernel),
            "problems": problems,
        }
        archive = kernel.archive
        if archive is None:
            problems.append("Its kernel.json names no archive; reinstall it with `kernelprov install`.")
            return info
        try:
            st = os.stat(archive)
        except FileNotFoundError:
            st = None
            problems.append(f"The archive {archive} does not exist; reinstall the kernel or restore the archive.")
        except OSError as err:
            st = None
            problems.append(f"The archive {archive} cannot be read: {err.strerror}.")
        else:
            info["archive_size"] = st.st_size
            if not os.access(archive, os.R_OK):
                problems.append(f"The archive {archive} is not readable by you; ask its owner to make it readable.")
        manifest = self._manifest(archive, problems)
        detected = self._detected_format(archive, st, problems) if st is not None else None
        if manifest is not None:
            info.update(format=manifest.format, python_version=manifest.python_version, packages=manifest.packages,
                        pip_packages=getattr(manifest, "pip_packages", None))
            if manifest.conda_env is False:
                problems.append(str(not_a_conda_env(archive)))
            if st is None:
                info["archive_size"] = manifest.size
            elif st.st_size != manifest.size:
                problems.append(
                    f"The archive is {human_size(st.st_size)}, but was {human_size(manifest.size)} when packed: "
                    "it is cut short or was replaced. Reinstall the kernel or restore the archive."
                )
            if detected is not None and detected != manifest.format:
                problems.append(f"The archive is {detected}, but its manifest says {manifest.format}: reinstall the kernel.")
        elif detected is not None:
            info["format"] = detected  # no manifest: the archive's first bytes, never its name, say what it is
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
                # A kernel leases the env when it starts; "Stage now" does not.
                "used": lease_dir(entry.prefix).exists(),
                "in_use": entry.in_use,
            }
        info["staging"] = self._staging(archive, settings.cache_dir, entry)
        if entry is None and st is not None:
            try:
                info["last_failure"] = failures.last_failure(archive, cache_root=settings.cache_dir)
            except KernelprovError:
                pass  # the cache dir's own problem is reported by find_staged above
        return info

    def _staging(self, archive: Path, cache_dir: str, entry) -> dict[str, Any] | None:
        """The stage of ``archive`` under way on this node (from the panel, a kernel start or a
        job prologue), or the panel's own failed one; None when there is neither."""
        job = self._prewarm.get(archive, cache_dir)
        if job is not None and (entry is None or job.error):
            return job.as_dict()
        if entry is not None:
            return None
        progress = inventory.staging_progress(archive, cache_root=cache_dir)
        if progress is None:
            return None
        done, total = progress["done"], progress["total"]
        return {"done": done, "total": total, "fraction": min(done / total, 1.0) if total else None,
                "started_at": progress["started_at"], "elapsed": time.time() - progress["started_at"], "error": None}

    def _manifest(self, archive: Path, problems: list[str]):
        """The archive's manifest (cached by the sidecar's stat), None without one."""
        try:
            return self._manifests.get(manifest_path(archive), lambda _path: read_manifest(archive))
        except FileNotFoundError:
            return None
        except OSError as err:
            problems.append(f"The manifest of {archive} cannot be read: {err.strerror}.")
        except ArchiveError as err:
            problems.append(str(err))
        return None

    def _detected_format(self, archive: Path, st: os.stat_result, problems: list[str]) -> str | None:
        """The format the archive's first bytes say (cached by the archive's stat)."""
        try:
            return self._formats.get(archive, lambda path: detect_format(Path(path)), st)
        except OSError:
            return None
        except ArchiveError as err:
            problems.append(str(err))
            return None

    def start_staging(self, kernel: KernelprovKernel, loop: asyncio.AbstractEventLoop | None = None,
                      event_logger: Any = None) -> PrewarmJob:
        """Called by ``POST /kernelprov/envs/<name>/stage``: stage the kernel's env in a background
        thread (a no-op when it is staged already) and return the job whose progress GET reports.
        With the server's ``event_logger`` and event ``loop``, the stage's events go on the event
        bus too, as a kernel start's do.

        A second request while one runs returns the running job. Raises
        :class:`~kernelprov.errors.KernelprovError` when the kernel cannot be staged at all.
        """
        problems: list[str] = []
        settings = self._settings_for(kernel, problems)
        if kernel.archive is None or settings is None:
            raise ArchiveError(problems[0] if problems else "Its kernel.json names no archive; reinstall it with `kernelprov install`.")
        problems = self.describe(kernel)["problems"]
        if problems:  # the cheap checks already know this stage would fail
            raise ArchiveError(problems[0])
        return self._prewarm.start(kernel.archive, settings.cache_dir, settings.stage_options(), kernel_name=kernel.name,
                                   display_name=kernel.display_name, loop=loop, event_logger=event_logger)

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
        job = self._prewarm.get(kernel.archive, settings.cache_dir)
        if job is not None and not job.finished:
            raise CacheError(f"{kernel.name} is being staged right now; evict it once that has finished.")
        return inventory.evict(kernel.archive, cache_root=settings.cache_dir)

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


def _read_kernel(name: str, resource_dir: Path, path: str) -> KernelprovKernel | None:
    """Parse one kernel.json for :meth:`KernelprovEnvironments._kernels`; None if it is not a
    kernelprov kernel or cannot be parsed (logged once per version of the file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_KERNEL_JSON_BYTES + 1)
        if len(raw) > _MAX_KERNEL_JSON_BYTES:
            raise ValueError("larger than 1 MiB")
        spec = json.loads(raw)
        if not isinstance(spec, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        log.warning("kernelprov: skipping %s: %s", path, err)
        return None
    return kernel_from_spec(name, resource_dir, spec)


def _has_problem(env: dict[str, Any]) -> bool:
    """Whether the panel sorts ``env`` first: something stops it, or its last stage failed."""
    staging = env.get("staging") or {}
    return bool(env["problems"] or staging.get("error") or (env.get("last_failure") and not env.get("staged")))


def _slurm_jobs(kernel: KernelprovKernel) -> list[dict[str, Any]] | None:
    """For a Slurm kernel, the jobs of this server's running kernels of it (job id, state,
    reason, node, one-line description); None for a kernel that runs where the server does."""
    if not kernel.slurm:
        return None
    from .slurm.provisioner import slurm_jobs_of

    return slurm_jobs_of(kernel.resource_dir)
