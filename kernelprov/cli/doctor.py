"""``kernelprov doctor [NAME]``: check a kernel the way an admin debugging "my kernel does not
start" would, and say what to fix.

Called by the CLI (:func:`run_doctor`, ``kernelprov doctor``) and by ``kernelprov install`` for a
kernel outside the user's own dir (:func:`shared_access_findings`). Each check returns a
:class:`Finding`; nothing here changes anything — not even the cache, which is looked at (stat,
``os.access``) but never created. Every check runs and reports, whatever an earlier one found: one
broken thing must not hide the others.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..engine.archive import check_allowed, not_a_conda_env
from ..engine.formats import detect_format
from ..engine.inventory import find_staged
from ..engine.manifest import read_manifest
from ..engine.securedir import open_private_child, open_trusted_dir, user_name
from ..errors import KernelprovError
from ..jupyter.kernelspecs import PROVISIONER_NAME, KernelprovKernel, find_kernels, get_kernel, system_tool
from . import arguments

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


def run_doctor(args) -> int:
    """``kernelprov doctor [NAME]``: print the node's findings and each kernel's; exit 1 when any
    needs a fix. Called by :func:`kernelprov.cli.app.main` with the parsed arguments."""
    settings = arguments.settings(args)
    kernels = [get_kernel(args.name, args.kernels_dir)] if args.name else find_kernels(args.kernels_dir)
    sections = [("this node", check_node(settings))]
    sections += [(f"kernel {k.name!r} ({k.display_name})", check_kernel(k, settings, verify_hash=not args.no_hash))
                 for k in kernels]
    problems = 0
    for title, findings in sections:
        print(f"{title}:")
        for finding in findings:
            print(f"  {'ok ' if finding.ok else 'FIX'} {finding.what}" + ("" if finding.ok else f"\n      -> {finding.fix}"))
            problems += not finding.ok
    if not kernels:
        print("No kernelprov kernels found; install one with `kernelprov install NAME`.")
    print(f"{problems} problem(s) found." if problems else "No problems found.")
    return 1 if problems else 0


def check_kernel(kernel: KernelprovKernel, settings, *, verify_hash: bool = True) -> list[Finding]:
    """Every check for one kernel, in the order a start would trip over them.

    Called by ``kernelprov doctor`` for each kernel; a check that fails to run is reported as
    its own finding and the others still run."""
    findings = _guarded("run.sh", lambda: [_check_run_sh(kernel)])
    findings += _guarded("the archive", lambda: _check_archive(kernel, settings, verify_hash))
    findings += _guarded("the cache", lambda: _check_cache_for(kernel, settings))
    findings += _guarded("the kernel dir", lambda: [_check_visible_under_jupyterhub(kernel)])
    if not _in_user_data_dir(kernel.resource_dir):
        findings += _guarded("access for other users", lambda: shared_access_findings(stager_python(kernel), kernel.archive))
    return findings


def _guarded(what: str, check: Callable[[], list[Finding]]) -> list[Finding]:
    """Run one check; what stops it (a kernelprov error, an OS error) becomes its finding."""
    try:
        return check()
    except (KernelprovError, OSError) as err:
        return [Finding(False, f"{what} could not be checked", " ".join(str(err).split()))]


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
    findings = _guarded("the provisioner", lambda: [_check_provisioner()])
    findings += _guarded("the node-local cache", lambda: [cache_state(settings).finding])
    findings.append(Finding(bool(system_tool("flock")), "flock is available for kernel leases",
                            "install util-linux: without flock, envs in use are not protected from eviction"))
    return findings


_CACHE_FIX = "set KERNELPROV_CACHE_DIR (or --cache-dir DIR) to a writable directory on a local disk"


@dataclass
class CacheState:
    """This user's node-local cache as ``doctor`` finds it, without creating any of it."""

    finding: Finding
    #: This user's private cache dir when one exists and is usable (only then is it searched)
    user_dir: Path | None
    #: Free bytes where envs would be staged (None: not known)
    free: int | None


def cache_state(settings) -> CacheState:
    """Is the cache root usable by this user, and where is this user's dir in it? Read-only.

    Called by :func:`check_node` and for each kernel's room and staged checks. Stats the root and
    checks writability with ``os.access``; never creates the root or ``kernelprov-<user>``
    (which the first kernel start does), so running ``doctor`` leaves no trace on a node.
    """
    root = Path(settings.cache_dir).expanduser().absolute()
    existing = next((p for p in (root, *root.parents) if os.path.lexists(p)), Path("/"))
    if not existing.is_dir():
        return CacheState(Finding(False, f"the cache root {root} cannot be used: {existing} is not a directory", _CACHE_FIX),
                          None, None)
    free = _free_bytes(existing)
    if existing != root:
        if os.access(existing, os.W_OK | os.X_OK):
            what = f"the cache root {root} does not exist yet; the first kernel start creates it{_room(existing)}"
            return CacheState(Finding(True, what), None, free)
        what = f"the cache root {root} does not exist and {existing} is not writable by you"
        return CacheState(Finding(False, what, _CACHE_FIX), None, free)
    try:
        _root, root_fd = open_trusted_dir(root, create=False)
    except KernelprovError as err:
        return CacheState(Finding(False, f"the cache root {root} is unsafe to use", str(err)), None, free)
    base = f"kernelprov-{user_name()}"
    try:
        fd, problem = open_private_child(root_fd, base, create=False)
    finally:
        os.close(root_fd)
    if fd is not None:
        os.close(fd)
        user_dir = root / base
    else:
        user_dir = next((p for p in sorted(root.glob(f"{base}.*")) if _is_private_dir(p)), None)
    writable_root = os.access(root, os.W_OK | os.X_OK)
    if user_dir is None:
        # No dir of ours yet (or only a squatted one): the first start must make one in the root.
        state = "does not exist yet" if problem == "does not exist" else f"{problem}, so a private fallback will be made"
        what = f"cache {root / base} {state}"
        if writable_root:
            return CacheState(Finding(True, f"{what}; the first kernel start creates it{_room(root)}"), None, free)
        return CacheState(Finding(False, f"{what}, but the cache root {root} is not writable by you", _CACHE_FIX), None, free)
    free = _free_bytes(user_dir)
    if not os.access(user_dir, os.W_OK | os.X_OK):
        return CacheState(Finding(False, f"cache {user_dir} is not writable by you", _CACHE_FIX), user_dir, free)
    return CacheState(Finding(True, f"cache {user_dir} is private to you{_room(user_dir)}"), user_dir, free)


def _is_private_dir(path: Path) -> bool:
    """A fallback dir the stager would use: a real directory of ours, closed to others."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _free_bytes(path: Path) -> int | None:
    try:
        vfs = os.statvfs(path)
    except OSError:
        return None
    return vfs.f_bavail * vfs.f_frsize


def _room(path: Path) -> str:
    """"; 12.3 GB and 456789 files free" on the file system of ``path``, for a cache finding."""
    try:
        vfs = os.statvfs(path)
    except OSError:
        return ""
    return f"; {vfs.f_bavail * vfs.f_frsize / 1e9:.1f} GB and {vfs.f_favail} files free"


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
    if not archive.exists():
        return [Finding(False, f"archive {archive} does not exist",
                        f"it is missing: restore it to {archive}, or reinstall the kernel with "
                        f"`kernelprov install {kernel.name} --env-prefix ENV --replace` (or `--archive FILE --replace`)")]
    if not archive.is_file() or not os.access(archive, os.R_OK):
        return [Finding(False, f"archive {archive} is not readable by you", f"`chmod a+r {archive}` (shared kernels: "
                        "and a+x on each parent directory)")]
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

        try:
            found = scan(archive)
        except KernelprovError as err:
            findings.append(Finding(False, "archive cannot be read", str(err)))
            found = None
        if found is not None:
            ok = found.sha256 == manifest.sha256
            findings.append(Finding(ok, "archive matches its manifest's sha256" if ok
                                    else "archive does not match its manifest's sha256",
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
    return findings


def _check_cache_for(kernel: KernelprovKernel, settings) -> list[Finding]:
    """Room in the cache for the kernel's env, and whether it is staged here (read-only)."""
    archive = kernel.archive
    if archive is None or not archive.is_file():
        return []
    state = cache_state(settings)
    findings = []
    try:
        manifest = read_manifest(archive)
    except KernelprovError:
        manifest = None  # reported by _check_archive
    if manifest is not None and manifest.unpacked_bytes and state.free is not None:
        ok = state.free >= manifest.unpacked_bytes
        findings.append(Finding(ok, f"the cache has room for it ({manifest.unpacked_bytes / 1e6:.0f} MB needed, {state.free / 1e6:.0f} MB free)",
                                "" if ok else "free space (`kernelprov cache clean`) or set KERNELPROV_CACHE_DIR"))
    # Only an existing dir of ours is searched: looking it up otherwise would create it.
    staged = find_staged(archive, cache_root=settings.cache_dir) if state.user_dir is not None else None
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
