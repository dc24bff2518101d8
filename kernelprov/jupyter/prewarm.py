"""The panel's *Stage now*: pre-warm stages in background threads, one per archive and cache dir.

:class:`PrewarmJobs` is owned by :class:`kernelprov.jupyter.environments.KernelprovEnvironments`
(one per server), which checks a kernel before :meth:`PrewarmJobs.start` and reads
:meth:`PrewarmJobs.get` to report a stage's progress. Each stage is the engine's own
``ensure_staged`` — the one a kernel start runs — with its events on the server's event bus
(:class:`~kernelprov.jupyter.events.StagingEvents`), as a kernel start's are.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import stage
from ..errors import KernelprovError
from .events import StagingEvents


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
    #: Its events on the server's event bus (the same schema as a kernel start's)
    events: StagingEvents | None = None

    def report(self, done: int, total: int) -> None:
        """Progress callback for :func:`kernelprov.engine.stage.ensure_staged` (compressed bytes read)."""
        self.done, self.total = done, total
        if self.events is not None:
            self.events.progress_from_thread(done, total)

    def announce(self, method: str, *args: Any) -> None:
        """Emit one of its events from the staging thread (they are emitted on the loop's thread)."""
        if self.events is not None and self.events.loop is not None and not self.events.loop.is_closed():
            self.events.loop.call_soon_threadsafe(getattr(self.events, method), *args)

    def as_dict(self) -> dict[str, Any]:
        """The JSON the panel shows as "staging 37 %" or as the error that ended the stage."""
        return {
            "done": self.done,
            "total": self.total,
            "fraction": min(self.done / self.total, 1.0) if self.total else None,
            "started_at": self.started_at,
            "elapsed": time.time() - self.started_at,
            "error": self.error,
        }


class PrewarmJobs:
    """The server's running (and failed) pre-warm jobs, keyed by (archive, cache dir).

    A finished job that succeeded is forgotten (the staged env speaks for itself); a failed one is
    kept so that the panel can show its error until the next attempt. Thread-safe."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        self._jobs: dict[tuple[str, str], PrewarmJob] = {}
        self._lock = threading.Lock()
        self.log = log

    def get(self, archive: Path, cache_dir: str) -> PrewarmJob | None:
        """The job for ``archive`` in ``cache_dir``, running or failed, or None.

        Called by the panel's listing and fast poll, and by evict (which refuses while one runs)."""
        with self._lock:
            return self._jobs.get((str(archive), cache_dir))

    def start(self, archive: Path, cache_dir: str, stage_options: dict[str, Any], *, kernel_name: str,
              display_name: str, loop: asyncio.AbstractEventLoop | None = None, event_logger: Any = None) -> PrewarmJob:
        """Stage ``archive`` with ``stage_options`` (``ensure_staged``'s keywords) in a daemon thread
        and return its job; while one for the same archive and cache dir runs, return that one.

        Called by :meth:`KernelprovEnvironments.start_staging` once the kernel's cheap checks pass.
        With ``event_logger`` and ``loop`` the stage's events go on the server's event bus."""
        key = (str(archive), cache_dir)
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.finished:
                return job
            job = self._jobs[key] = PrewarmJob(archive, cache_dir)
            if event_logger is not None and loop is not None:
                job.events = StagingEvents(event_logger, archive, loop=loop, kernel_name=kernel_name,
                                           display_name=display_name)
        # A daemon thread, not the event loop's executor: a server shutting down mid-stage must not
        # wait for it, and a killed stage leaves nothing that a later one trusts.
        thread = threading.Thread(target=self._run, args=(job, stage_options, key), name=f"kernelprov-stage-{kernel_name}",
                                  daemon=True)
        thread.start()
        return job

    def _run(self, job: PrewarmJob, stage_options: dict[str, Any], key: tuple[str, str]) -> None:
        """The staging thread: one ``ensure_staged``, its outcome on the job and the event bus."""
        job.announce("started")
        try:
            staged = stage.ensure_staged(job.archive, progress=job.report, **stage_options)
        except KernelprovError as err:
            self.log.warning("kernelprov: pre-warm of %s failed: %s", job.archive, err)
            job.error = str(err)
        except Exception as err:  # a thread has nobody to raise to: log it and show it in the panel
            self.log.exception("kernelprov: pre-warm of %s failed unexpectedly", job.archive)
            job.error = f"Staging failed unexpectedly: {err!r}; see the server log."
        else:
            self.log.info("kernelprov: pre-warmed %s at %s in %.1f s", job.archive, staged.prefix, staged.seconds)
            job.announce("finished", staged.seconds, staged.extracted)
        if job.error is not None:
            job.announce("failed", job.error)
        job.finished = True
        if job.error is None:
            with self._lock:
                if self._jobs.get(key) is job:
                    del self._jobs[key]
