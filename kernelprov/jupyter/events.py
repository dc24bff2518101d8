"""Staging events on jupyter_server's event bus, for JupyterLab to show a start's progress.

One schema, :data:`STAGING_SCHEMA_ID` (``event_schemas/staging/v1.yaml``, shipped in the
package), registered by the server extension (:mod:`.serverext`) and, lazily, by the first
emit. Events reach JupyterLab through ``/api/events/subscribe`` (its ``serviceManager.events``).
Emitted by the provisioner for its kernel during ``pre_launch`` and by the panel's Stage now
(:mod:`.environments`): one ``started``, ``progress`` at most once a second, one ``finished`` or
``failed``. Without a server (plain ``jupyter_client``) there is no event logger and nothing is
emitted.

NOTE: emit on the event loop's thread only: jupyter_events runs its listeners (the websocket
subscribers among them) as asyncio tasks of the current thread's loop. Staging runs in a worker
thread, whose progress callback must hop back (:meth:`StagingEvents.progress_from_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from jsonschema.exceptions import ValidationError

log = logging.getLogger(__name__)

STAGING_SCHEMA_ID = "https://events.kernelprov.org/staging/v1"
STAGING_SCHEMA_PATH = Path(__file__).with_name("event_schemas") / "staging" / "v1.yaml"
#: ``progress`` events of one staging come at most this often (the engine reports every 4 MB).
PROGRESS_INTERVAL_SECONDS = 1.0

_FIELDS = ("kernel_id", "kernel_name", "display_name", "done", "total", "elapsed", "seconds", "outcome", "message")


def event_logger_of(owner: Any):
    """The jupyter_events ``EventLogger`` of ``owner`` (a ``ServerKernelManager``, the
    ``ServerApp``), or None: a plain ``jupyter_client`` kernel manager has none."""
    from jupyter_events import EventLogger

    event_logger = getattr(owner, "event_logger", None)
    return event_logger if isinstance(event_logger, EventLogger) else None


def register_staging_schema(event_logger) -> None:
    """Register the staging schema with ``event_logger`` unless it already has it.

    Called by the server extension at start-up and by :func:`emit_staging` (so the events also
    flow when the extension is disabled but the provisioner runs)."""
    if event_logger is not None and STAGING_SCHEMA_ID not in event_logger.schemas:
        event_logger.register_event_schema(STAGING_SCHEMA_PATH)


def emit_staging(event_logger, action: str, *, archive: str | Path, kernel_id: str | None = None,
                 kernel_name: str | None = None, display_name: str | None = None, done: int | None = None,
                 total: int | None = None, elapsed: float | None = None, seconds: float | None = None,
                 outcome: str | None = None, message: str | None = None) -> dict | None:
    """Emit one staging event (``action``: started, progress, finished or failed); return it.

    ``event_logger`` None (no server): nothing happens. Fields left None are left out; for
    ``progress``, ``fraction`` (0..1) and ``eta`` (seconds left, None until something was read)
    are computed here from ``done``, ``total`` and ``elapsed``. ``finished`` takes ``seconds`` and
    ``outcome`` ("unpacked" or "reused"), ``failed`` ``seconds`` and ``message``. Call it on the
    event loop's thread. An event the schema refuses is logged, never raised: a start must not
    fail because its progress could not be shown.
    """
    if event_logger is None:
        return None
    register_staging_schema(event_logger)
    values = dict(kernel_id=kernel_id, kernel_name=kernel_name, display_name=display_name, done=done, total=total,
                  elapsed=elapsed, seconds=seconds, outcome=outcome, message=message)
    data: dict[str, Any] = {"action": action, "archive": str(archive)}
    data.update({name: values[name] for name in _FIELDS if values[name] is not None})
    if action == "progress" and done is not None and total is not None:
        data["fraction"] = min(done / total, 1.0) if total > 0 else 0.0
        if elapsed is not None:
            data["eta"] = round(elapsed * (total - done) / done, 1) if done > 0 else None
    for name in ("elapsed", "seconds"):
        if name in data:
            data[name] = round(float(data[name]), 3)
    try:
        event_logger.emit(schema_id=STAGING_SCHEMA_ID, data=data)
    except ValidationError as err:
        log.warning("kernelprov: not emitting the staging event %r: %s", data, err.message)
        return None
    return data


class StagingEvents:
    """The events of one staging: :meth:`started`, :meth:`progress` (rate-limited),
    :meth:`finished` or :meth:`failed`, each carrying the same identity fields.

    Made by the provisioner for each ``pre_launch``; the panel's Stage now may use one too.
    ``event_logger`` None makes every method a no-op. ``loop`` is the event loop that
    :meth:`progress_from_thread` hops back to (default: the running one).
    """

    def __init__(self, event_logger, archive: str | Path, *, loop: asyncio.AbstractEventLoop | None = None,
                 **identity: str | None):
        self.event_logger, self.archive, self.identity = event_logger, str(archive), identity
        self.loop = loop if loop is not None or event_logger is None else asyncio.get_running_loop()
        self._began = time.monotonic()
        self._last_progress = float("-inf")
        self._last_done = -1
        self.last_report = self._began  # monotonic time of the last progress seen, emitted or not

    @property
    def enabled(self) -> bool:
        """Is anybody listening (is there an event logger)?"""
        return self.event_logger is not None

    def _emit(self, action: str, **fields) -> dict | None:
        return emit_staging(self.event_logger, action, archive=self.archive, **self.identity, **fields)

    def started(self) -> None:
        """Staging began (on the loop's thread)."""
        self._emit("started")

    def progress(self, done: int, total: int, elapsed: float | None = None) -> None:
        """``done`` of ``total`` archive bytes were read (on the loop's thread); emitted at most
        every :data:`PROGRESS_INTERVAL_SECONDS` (``finished`` says when it is all done), and never
        twice for the same ``done``. ``elapsed`` defaults to the time since this object was made
        (give it for a stage that another process started earlier)."""
        now = self.last_report = time.monotonic()
        if not self.enabled or done == self._last_done or now - self._last_progress < PROGRESS_INTERVAL_SECONDS:
            return
        self._last_progress, self._last_done = now, done
        self._emit("progress", done=done, total=total, elapsed=now - self._began if elapsed is None else elapsed)

    def progress_from_thread(self, done: int, total: int) -> None:
        """The engine's progress callback (any thread): hands the report to the loop, never waits."""
        if self.loop is None or self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (server shutting down)
            self.loop.call_soon_threadsafe(self.progress, done, total)

    def finished(self, seconds: float, unpacked: bool) -> None:
        """The env is ready: ``unpacked`` by this staging, or reused."""
        self._emit("finished", seconds=seconds, outcome="unpacked" if unpacked else "reused")

    def failed(self, message: str) -> None:
        """Staging failed with ``message`` (the text of the KernelprovError)."""
        self._emit("failed", seconds=time.monotonic() - self._began, message=message)
