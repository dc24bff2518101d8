"""Slurm's own command-line tools as plain, blocking functions; no scheduler logic of our own.

Called by :class:`.provisioner.KernelprovSlurmProvisioner` from its own threads (never the
server's event loop). A job is followed with Slurm's own tools, cheapest first
(:func:`job_state`): ``squeue`` for a job that waits or runs (state, reason, node, time left);
once it has left the queue, ``scontrol show job`` for its final state and exit code, which
slurmctld keeps in memory for ``MinJobAge`` after the end; after that ``sacct``, when the site
keeps accounting (``AccountingStorageType`` other than none). A job none of them knows is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from ...errors import KernelprovError

log = logging.getLogger(__name__)

#: States in which the job's kernel may still run or start (Slurm's JOB_STATE names).
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
                           "STAGE_OUT", "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD"})
#: How long a Slurm command may take before it is treated as failed.
COMMAND_TIMEOUT = 30


class SlurmError(KernelprovError):
    """A Slurm command failed or Slurm refused a request (its message included)."""


@dataclass
class JobState:
    """One look at a job: what ``squeue``, ``scontrol show job`` or ``sacct`` said, when."""

    job_id: str
    state: str
    reason: str = ""
    node: str = ""
    exit_code: int | None = None
    #: Seconds until the job's time limit, as squeue said (None: no limit, or not known).
    time_left: float | None = None
    seen_at: float = field(default_factory=time.time)

    @property
    def active(self) -> bool:
        """The job waits or runs (its kernel may still start or run)."""
        return self.state in ACTIVE_STATES

    def describe(self) -> str:
        """"Pending: Resources", "Running on kpsl-n1", "Failed: NonZeroExitCode", ..."""
        name = self.state.replace("_", " ").capitalize()
        if self.state == "RUNNING" and self.node:
            return f"{name} on {self.node}"
        if self.reason and self.reason != "None":
            return f"{name}: {self.reason}"
        return name


def tool(name: str, bin_dir: str = "") -> str:
    """Absolute path of Slurm tool ``name`` (in ``bin_dir`` when given, else on ``PATH``)."""
    found = shutil.which(name, path=bin_dir or None)
    if found is None:
        where = bin_dir or "PATH"
        raise SlurmError(f"Slurm's {name} is not on {where}; install Slurm's client tools on the Jupyter server's "
                         "node, or set c.KernelprovSlurmProvisioner.slurm_bin_dir.")
    return found


def _run(argv: list[str], *, stdin: str | None = None) -> str:
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise SlurmError(f"{os.path.basename(argv[0])} did not answer within {COMMAND_TIMEOUT} s; is slurmctld up?") from err
    except OSError as err:
        raise SlurmError(f"Cannot run {argv[0]}: {err.strerror}.") from err
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SlurmError(f"{os.path.basename(argv[0])} failed: {message[-1] if message else f'exit {result.returncode}'}")
    return result.stdout


def submit(script: str, options: list[str], *, bin_dir: str = "") -> str:
    """Submit ``script`` (the batch script's text, on stdin: no file to leave behind) with
    ``sbatch`` ``options``; return the job id."""
    out = _run([tool("sbatch", bin_dir), "--parsable", *options], stdin=script).strip()
    job_id = out.split(";")[0]  # --parsable: "<id>[;<cluster>]"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out!r}, not a job id.")
    return job_id


_FIELD = re.compile(r"(\w+)=(\S*)")
_SQUEUE_FORMAT = "%i|%T|%r|%N|%L"


def job_state(job_id: str, *, bin_dir: str = "") -> JobState | None:
    """What Slurm says about ``job_id`` now, or None when it no longer knows the job."""
    live = _squeue_state(job_id, bin_dir)
    if live is not None and live.active:
        return live
    ended = _scontrol_state(job_id, bin_dir)  # final state and exit code while slurmctld remembers
    if ended is not None:
        return ended
    return live or _sacct_state(job_id, bin_dir)


def _squeue_state(job_id: str, bin_dir: str) -> JobState | None:
    try:
        out = _run([tool("squeue", bin_dir), "--noheader", "--jobs", job_id, "--format", _SQUEUE_FORMAT])
    except SlurmError as err:
        if "Invalid job id" in str(err):
            return None
        raise
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 5 and fields[0] == job_id:
            _, state, reason, node, left = fields
            return JobState(job_id, state, reason, "" if node in ("(null)", "None") else node,
                            time_left=parse_time_left(left))
    return None


def _scontrol_state(job_id: str, bin_dir: str) -> JobState | None:
    try:
        out = _run([tool("scontrol", bin_dir), "show", "job", "--oneliner", job_id])
    except SlurmError as err:
        if "Invalid job id" in str(err):
            return None
        raise
    fields = dict(_FIELD.findall(out))
    node = fields.get("NodeList", "")
    return JobState(job_id, fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""),
                    "" if node in ("(null)", "None") else node, _exit_code(fields.get("ExitCode", "")))


def _sacct_state(job_id: str, bin_dir: str) -> JobState | None:
    """The job as the accounting database recorded it; None without accounting (or sacct)."""
    try:
        out = _run([tool("sacct", bin_dir), "--noheader", "--parsable2", "--allocations", "--jobs", job_id,
                    "--format", "JobID,State,ExitCode,NodeList"])
    except SlurmError as err:
        log.debug("kernelprov: no sacct record of Slurm job %s: %s", job_id, err)
        return None
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) == 4 and fields[0] == job_id:
            node = fields[3]
            return JobState(job_id, (fields[1].split() or ["UNKNOWN"])[0], "", "" if node == "None assigned" else node,
                            _exit_code(fields[2]))
    return None


def _exit_code(text: str) -> int | None:
    """Slurm's "3:0" (exit code 3, no signal) as 3."""
    code = text.split(":")[0]
    return int(code) if code.isdigit() else None


def parse_time_left(text: str) -> float | None:
    """squeue's ``%L`` ("1-02:03:04", "45:10", "UNLIMITED") in seconds; None when there is no limit."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not all(part.isdigit() for part in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + int(days or 0) * 86400)


def cancel(job_id: str, *, signal: str | None = None, batch: bool = False, full: bool = False,
           bin_dir: str = "") -> None:
    """``scancel`` the job, or with ``signal`` send it that signal: ``batch`` to the batch
    script's process only (the launcher, which passes it on to the kernel), ``full`` to the batch
    script's processes and their children. A job that already ended is not an error."""
    argv = [tool("scancel", bin_dir)]
    if signal:
        argv.append(f"--signal={signal}")
    if batch:
        argv.append("--batch")
    if full:
        argv.append("--full")
    try:
        _run([*argv, job_id])
    except SlurmError as err:
        if "Invalid job id" in str(err) or "already completing or completed" in str(err):
            return
        raise


def cancel_quietly(job_ids: list[str], *, bin_dir: str = "") -> None:
    """Cancel jobs at interpreter exit: never raises, logs what failed."""
    if not job_ids:
        return
    try:
        subprocess.run([tool("scancel", bin_dir), *job_ids], capture_output=True, timeout=COMMAND_TIMEOUT)
    except (KernelprovError, OSError, subprocess.TimeoutExpired) as err:
        log.warning("kernelprov: could not cancel Slurm jobs %s at exit: %s", ", ".join(job_ids), err)
