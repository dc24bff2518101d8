"""``kernelprov doctor [NAME]``: check a kernel the way an admin debugging "my kernel does not
start" would, and say what to fix.

Called by the CLI. Each check returns a :class:`Finding`; nothing here changes anything.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..engine import cache
from ..engine.archive import check_allowed, not_a_conda_env
from ..engine.formats import detect_format
from ..engine.inventory import find_staged, user_dirs
from ..engine.manifest import read_manifest
from ..errors import KernelprovError
from ..jupyter.kernelspecs import PROVISIONER_NAME, KernelprovKernel, system_tool

# Kernels installed before kernel.json recorded the stager: read it from their run.sh.
_STAGER = re.compile(r'KERNELPROV_ENV="\$\((.+?)(?: -I)? -m kernelprov unpack')
# run.sh written before the stager ran isolated: it imports from the kernel's working directory.
_UNISOLATED_STAGER = re.compile(r'KERNELPROV_ENV="\$\((?:(?! -I ).)+ -m kernelprov unpack')


@dataclass
class Finding:
    """One check: ``ok`` False means the kernel will not start (or not well) until ``fix`` is done."""

    ok: bool
    what: str
    fix: str = ""


def check_kernel(kernel: KernelprovKernel, settings, *, verify_hash: bool = True) -> list[Finding]:
    """Every check for one kernel, in the order a start would trip over them."""
    findings = [_check_run_sh(kernel)]
    findings += _check_archive(kernel, settings, verify_hash)
    findings.append(_check_visible_under_jupyterhub(kernel))
    if not _in_user_data_dir(kernel.resource_dir):
        findings += shared_access_findings(stager_python(kernel), kernel.archive)
    return findings


def stager_python(kernel: KernelprovKernel) -> str | None:
    """The interpreter run.sh stages through when no provisioner started it.

    Read from ``kernel.json`` (``metadata.kernelprov.stager``), where ``kernelprov install``
    records it; kernels installed before it did so are read from their run.sh.
    """
    if kernel.stager:
        return kernel.stager
    run_sh = kernel.resource_dir / "run.sh"
    try:
        match = _STAGER.search(run_sh.read_text())
    except OSError:
        return None
    return shlex.split(match.group(1))[0] if match else None


def reachable_by_others(path: Path, access: int) -> bool:
    """Can any user reach ``path`` with ``access`` (``os.R_OK``/``os.X_OK``) by its "other" bits?"""
    path = Path(os.path.realpath(path))
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    needed = {os.R_OK: 0o004, os.X_OK: 0o001}[access]
    return bool(mode & needed) and all(parent.stat().st_mode & 0o001 for parent in path.parents)


def shared_access_findings(stager: str | None, archive: Path | None) -> list[Finding]:
    """For a global kernel: can every user run its stager and read its archive and manifest?

    Called by ``doctor`` and at ``install`` time for kernels outside the installer's home.
    """
    findings = []
    if stager:
        ok = reachable_by_others(Path(stager), os.X_OK)
        findings.append(Finding(ok, f"other users can run the stager {stager}" if ok else f"other users cannot run the stager {stager}",
                                "" if ok else "install the kernel from a kernelprov in a world-readable environment "
                                "(not under a private home such as /root)"))
    if archive is not None and archive.exists():
        for path in (archive, Path(f"{archive}.manifest.json")):
            if path.exists():
                ok = reachable_by_others(path, os.R_OK)
                findings.append(Finding(ok, f"other users can read {path}" if ok else f"other users cannot read {path}",
                                        "" if ok else f"chmod a+r {path} and a+x on each parent directory"))
    return findings


def _in_user_data_dir(path: Path) -> bool:
    from jupyter_core.paths import jupyter_data_dir

    return str(path).startswith(str(Path(jupyter_data_dir())) + os.sep)


def check_node(settings) -> list[Finding]:
    """Checks that do not depend on a kernel: provisioner installed, cache usable, leases."""
    findings = [_check_provisioner()]
    try:
        dirs = user_dirs(settings.cache_dir)
        vfs = os.statvfs(dirs[0])
        findings.append(Finding(True, f"cache {dirs[0]} is private to you; {vfs.f_bavail * vfs.f_frsize / 1e9:.1f} GB "
                                      f"and {vfs.f_favail} files free"))
    except KernelprovError as err:
        findings.append(Finding(False, "the node-local cache is unusable", str(err)))
    findings.append(Finding(bool(system_tool("flock")), "flock is available for kernel leases",
                            "install util-linux: without flock, envs in use are not protected from eviction"))
    return findings


def _check_run_sh(kernel: KernelprovKernel) -> Finding:
    run_sh = kernel.resource_dir / "run.sh"
    if not os.access(run_sh, os.X_OK):
        return Finding(False, f"{run_sh} is not executable", f"chmod a+rx {run_sh}, or reinstall with --replace")
    stager = stager_python(kernel)
    if stager:
        if not os.access(stager, os.X_OK):
            return Finding(False, f"run.sh stages through {stager}, which you cannot execute",
                           "reinstall the kernel with a kernelprov that every user can run (e.g. the site's Jupyter env)")
    try:
        unisolated = bool(_UNISOLATED_STAGER.search(run_sh.read_text()))
    except OSError:
        unisolated = False
    if unisolated:
        return Finding(False, f"{run_sh} runs its stager with the kernel's folder on sys.path (written by an older kernelprov)",
                       f"reinstall it: `kernelprov install {kernel.name} --archive {kernel.archive} --replace`")
    return Finding(True, f"{run_sh} is executable")


def _check_archive(kernel: KernelprovKernel, settings, verify_hash: bool) -> list[Finding]:
    archive = kernel.archive
    if archive is None:
        return [Finding(False, "kernel.json names no archive", "reinstall with `kernelprov install NAME --archive FILE`")]
    if not archive.is_file() or not os.access(archive, os.R_OK):
        state = "does not exist" if not archive.exists() else "is not readable by you"
        return [Finding(False, f"archive {archive} {state}", f"restore it, or `chmod a+r {archive}` for shared kernels")]
    findings = [Finding(True, f"archive {archive} is readable ({archive.stat().st_size / 1e6:.0f} MB, {detect_format(archive)})")]
    try:
        manifest = read_manifest(archive)
    except KernelprovError as err:
        # One sentence naming the sidecar (unreadable, not JSON, wrong shape or types): for this kernel only.
        return findings + [Finding(False, "its manifest cannot be used", str(err))]
    if manifest is None:
        findings.append(Finding(False, "no manifest: starts are not checked for corruption",
                                f"`kernelprov install {kernel.name} --archive {archive} --replace` writes one"))
    elif manifest.size != archive.stat().st_size:
        findings.append(Finding(False, f"archive is {archive.stat().st_size} bytes, its manifest says {manifest.size}",
                                "it is incomplete or was replaced: re-create it with `kernelprov pack`"))
    elif verify_hash:
        from ..engine.extract import scan

        found = scan(archive)
        ok = found.sha256 == manifest.sha256
        findings.append(Finding(ok, "archive matches its manifest's sha256" if ok else "archive does not match its manifest's sha256",
                                "" if ok else "it is corrupt or was replaced: re-create it with `kernelprov pack`"))
        if manifest.conda_env is None and found.conda_env is not None:
            manifest.conda_env = found.conda_env
    if manifest is not None and manifest.conda_env is False:
        findings.append(Finding(False, "archive holds no conda env (no bin/python or conda-meta/)", str(not_a_conda_env(archive))))
    elif manifest is not None and manifest.conda_env:
        findings.append(Finding(True, "archive is a conda env with bin/python"))
    allowed = settings.stage_options()["allowed_roots"]
    if allowed:
        try:
            check_allowed(archive, allowed)
            findings.append(Finding(True, "archive is inside the site's allowed archive roots"))
        except KernelprovError as err:
            findings.append(Finding(False, "archive is outside the site's allowed archive roots", str(err)))
    if manifest is not None and manifest.unpacked_bytes:
        vfs = os.statvfs(cache.user_cache_dir(Path(settings.cache_dir)))
        free = vfs.f_bavail * vfs.f_frsize
        ok = free >= manifest.unpacked_bytes
        findings.append(Finding(ok, f"the cache has room for it ({manifest.unpacked_bytes / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free)",
                                "" if ok else "free space (`kernelprov cache clean`) or set KERNELPROV_CACHE_DIR"))
    staged = find_staged(archive, cache_root=settings.cache_dir)
    findings.append(Finding(True, f"staged on this node at {staged.prefix}" if staged else "not staged on this node yet"))
    return findings


def _check_visible_under_jupyterhub(kernel: KernelprovKernel) -> Finding:
    in_home = _in_user_data_dir(kernel.resource_dir)
    hidden = os.environ.get("JUPYTERHUB_DISABLE_USER_CONFIG", "") not in ("", "0")
    if in_home and hidden:
        return Finding(False, "JupyterHub's disable_user_config hides kernels in your home directory",
                       "install it with --sys-prefix or --kernels-dir DIR (a dir on JUPYTER_PATH)")
    return Finding(True, f"kernel dir {kernel.resource_dir} is on the Jupyter path")


def _check_provisioner() -> Finding:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="jupyter_client.kernel_provisioners")}
    ok = PROVISIONER_NAME in names
    return Finding(ok, f"the {PROVISIONER_NAME} provisioner is installed in this Python" if ok
                   else f"{PROVISIONER_NAME} is not installed in this Python",
                   "" if ok else "pip install kernelprov into the Jupyter server's environment")
