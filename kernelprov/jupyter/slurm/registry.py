"""The Slurm kernels of this server process: what the panel shows of their jobs, and exit's cleanup.

:class:`.provisioner.KernelprovSlurmProvisioner` adds itself to :data:`RUNNING` when it submits
or reuses a job and removes itself when the kernel has no job any more. The panel's listing
(:mod:`kernelprov.jupyter.environments`) reads it through :func:`slurm_jobs_of`; at interpreter
exit every job still in it is cancelled.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

from . import jobs

#: The Slurm kernels of this server process, by kernel id (their provisioners).
RUNNING: dict[str, Any] = {}


def slurm_jobs_of(resource_dir: str | os.PathLike) -> list[dict]:
    """The Slurm jobs of this server's running kernels of the kernelspec in ``resource_dir``,
    each as :func:`slurm_job_state` describes it plus its ``kernel_id``; called by the panel's
    listing (:mod:`kernelprov.jupyter.environments`), from any thread (it only reads)."""
    wanted = os.path.realpath(resource_dir)
    found = []
    for kernel_id, provisioner in list(RUNNING.items()):
        spec_dir = getattr(provisioner.kernel_spec, "resource_dir", None)
        if spec_dir and os.path.realpath(spec_dir) == wanted:
            state = slurm_job_state(kernel_id)
            if state is not None:
                found.append({"kernel_id": kernel_id, **state})
    return found


def slurm_job_state(kernel_id: str) -> dict | None:
    """The Slurm job of a running Slurm kernel, or None when ``kernel_id`` is not one.

    For the panel (and any REST handler): returns ``{"job_id", "state", "reason", "node",
    "description", "submitted_at", "seen_at", "generation"}`` — ``state`` is Slurm's
    (``PENDING``, ``RUNNING``, ...), ``description`` the one line to show ("Pending: Resources",
    "Running on n1"), ``generation`` how many times the kernel was restarted in this job. It reads
    the provisioner's last look at the job (refreshed about every second while the kernel starts,
    at every ``poll`` after), so it is cheap and never blocks: call it from the event loop."""
    provisioner = RUNNING.get(kernel_id)
    if provisioner is None or provisioner.job_id is None:
        return None
    seen = provisioner.last_state
    return {
        "job_id": provisioner.job_id,
        "state": seen.state if seen else "SUBMITTED",
        "reason": seen.reason if seen else "",
        "node": (seen.node if seen else "") or provisioner.node,
        "description": seen.describe() if seen else "Submitted",
        "submitted_at": provisioner.submitted_at,
        "seen_at": seen.seen_at if seen else None,
        "generation": provisioner.generation,
    }


@atexit.register
def _cancel_leftover_jobs() -> None:
    """A server that exits without shutting its kernels down leaves no job behind."""
    by_bin_dir: dict[str, list[str]] = {}
    for provisioner in list(RUNNING.values()):
        if provisioner.job_id:
            by_bin_dir.setdefault(provisioner.slurm_bin_dir, []).append(provisioner.job_id)
    for bin_dir, job_ids in by_bin_dir.items():
        jobs.cancel_quietly(job_ids, bin_dir=bin_dir)
