"""Guarantee: on a shared node, each user's envs live in a private cache that nobody else can read,
replace or inject into, and a squatted cache directory never captures or blocks a user.

Real unix users (``useradd``) run the engine with Debian's /usr/bin/python3 — an interpreter
they can execute, unlike the test runner's under root's home — from a world-readable copy of
kernelprov. That interpreter (3.11.2) has no tarfile filters, so our own validation is what runs.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import kernelprov

SYSTEM_PYTHON = "/usr/bin/python3"
USERS = ("kpalice", "kpbob")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser") or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root, useradd, runuser and /usr/bin/python3 to run as separate unix users",
)

_STAGE = """
import json, sys, logging
logging.basicConfig(level=logging.WARNING)
from kernelprov.engine.stage import ensure_staged
from kernelprov.errors import KernelprovError
try:
    print(json.dumps({"prefix": str(ensure_staged(sys.argv[1]).prefix)}))
except KernelprovError as err:
    print(json.dumps({"error": str(err)}))
"""

_PROBE = """
import json, os, sys
target = sys.argv[1]
results = {}
for name, attempt in {
    "list": lambda: os.listdir(target),
    "read": lambda: open(os.path.join(target, sys.argv[2])).read(),
    "create": lambda: open(os.path.join(target, "injected"), "w").write("x"),
    "replace": lambda: os.rename(os.path.join(target, sys.argv[3]), os.path.join(target, "moved")),
}.items():
    try:
        attempt()
        results[name] = "allowed"
    except PermissionError:
        results[name] = "denied"
    except OSError as err:
        results[name] = type(err).__name__
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """World-readable engine copy + shared cache root (sticky, like /tmp) + archives dir."""
    top = Path(tempfile.mkdtemp(prefix="kernelprov-multiuser-", dir="/tmp"))
    os.chmod(top, 0o755)
    lib = top / "lib"
    shutil.copytree(Path(kernelprov.__file__).parent, lib / "kernelprov", ignore=shutil.ignore_patterns("__pycache__", "labextension"))
    (top / "archives").mkdir()
    root = top / "nodelocal"
    root.mkdir()
    os.chmod(root, 0o1777)
    subprocess.run(["chmod", "-R", "a+rX", str(lib), str(top / "archives")], check=True)
    yield {"lib": lib, "root": root, "archives": top / "archives"}
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def users():
    created = []
    for user in USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True)
            created.append(user)
    yield {user: pwd.getpwnam(user) for user in USERS}
    for user in created:
        subprocess.run(["userdel", user], check=False)


@pytest.fixture
def fresh_root(shared):
    """Empty the shared cache root between tests (it is shared by design)."""
    for child in shared["root"].iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return shared["root"]


def run_as(user: str, shared, code: str, *args: str, **environ: str) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(shared["lib"]), "KERNELPROV_CACHE_DIR": str(shared["root"]),
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent", **environ}
    result = subprocess.run([shutil.which("runuser"), "-u", user, "--", SYSTEM_PYTHON, "-c", code, *args],
                            capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "stderr": result.stderr}


@pytest.fixture
def shared_archive(shared, tiny_archives) -> Path:
    target = shared["archives"] / "tiny.tar.gz"
    shutil.copy2(tiny_archives["tar.gz"], target)
    os.chmod(target, 0o644)
    return target


def test_each_user_stages_into_a_private_cache_nobody_else_can_touch(users, shared, fresh_root, shared_archive):
    alice = run_as("kpalice", shared, _STAGE, str(shared_archive))
    prefix = Path(alice["prefix"])
    alice_dir = prefix.parent
    assert alice_dir == fresh_root / "kernelprov-kpalice"
    st = os.lstat(alice_dir)
    assert st.st_uid == users["kpalice"].pw_uid and stat.S_IMODE(st.st_mode) == 0o700
    before = sorted(os.listdir(alice_dir))

    attempts = run_as("kpbob", shared, _PROBE, str(alice_dir), f"{prefix.name}/etc/tiny.conf", prefix.name)
    assert {k: attempts[k] for k in ("list", "read", "create", "replace")} == dict.fromkeys(
        ("list", "read", "create", "replace"), "denied")
    inside = run_as("kpbob", shared, _PROBE, str(prefix), "etc/tiny.conf", "etc")
    assert inside["list"] == inside["read"] == inside["create"] == "denied"

    bob = run_as("kpbob", shared, _STAGE, str(shared_archive))
    assert Path(bob["prefix"]).parent == fresh_root / "kernelprov-kpbob"
    assert sorted(os.listdir(alice_dir)) == before  # nothing injected, nothing replaced
    assert (prefix / "etc/tiny.conf").read_text() == f"prefix={prefix}\ndata={prefix}/share/tiny\n"


@pytest.mark.parametrize("squat", ["other-owner", "symlink", "world-writable"])
def test_a_squatted_cache_dir_is_refused_and_a_private_fallback_works(squat, users, shared, fresh_root, shared_archive, tmp_path):
    expected = fresh_root / "kernelprov-kpalice"
    decoy = Path(tempfile.mkdtemp(prefix="bobs-", dir=fresh_root))
    os.chown(decoy, users["kpbob"].pw_uid, users["kpbob"].pw_gid)
    if squat == "other-owner":
        expected.mkdir(mode=0o777)
        os.chmod(expected, 0o777)
        os.chown(expected, users["kpbob"].pw_uid, users["kpbob"].pw_gid)
        reason = "is owned by another user"
    elif squat == "symlink":
        expected.symlink_to(decoy)
        reason = "is a symbolic link"
    else:
        expected.mkdir()
        os.chmod(expected, 0o777)
        os.chown(expected, users["kpalice"].pw_uid, users["kpalice"].pw_gid)
        reason = "is accessible to other users"

    alice = run_as("kpalice", shared, _STAGE, str(shared_archive))

    fallback = Path(alice["prefix"]).parent
    assert fallback.parent == fresh_root and re.fullmatch(r"kernelprov-kpalice\.[0-9a-f]{8}", fallback.name)
    st = os.lstat(fallback)
    assert st.st_uid == users["kpalice"].pw_uid and stat.S_IMODE(st.st_mode) == 0o700
    assert f"{expected} {reason}; not using it" in alice["stderr"]
    assert os.listdir(decoy) == []  # nothing of alice's went where bob could see it
    if squat != "symlink":
        assert os.listdir(expected) == []


_STAGE_TWICE = _STAGE.replace(
    'print(json.dumps({"prefix": str(ensure_staged(sys.argv[1]).prefix)}))',
    'first, second = ensure_staged(sys.argv[1]), ensure_staged(sys.argv[1]); '
    'print(json.dumps({"prefix": str(second.prefix), "first": str(first.prefix), "reused": not second.extracted}))',
)


def test_a_neighbour_cannot_exhaust_the_fallbacks(users, shared, fresh_root, shared_archive):
    # bob takes the name, every numbered fallback of old, and a heap of random-looking ones.
    squatted = ["kernelprov-kpalice"] + [f"kernelprov-kpalice.{i}" for i in range(1, 5)]
    squatted += [f"kernelprov-kpalice.{n:08x}" for n in range(0, 2**32, 2**32 // 200)]
    run_as("kpbob", shared, "import os, sys, json\nfor name in sys.argv[2:]: os.mkdir(os.path.join(sys.argv[1], name), 0o777)\n"
           "print(json.dumps({}))", str(fresh_root), *squatted)

    alice = run_as("kpalice", shared, _STAGE_TWICE, str(shared_archive))

    fallback = Path(alice["prefix"]).parent
    assert fallback.name not in squatted and fallback.name.startswith("kernelprov-kpalice.")
    assert os.lstat(fallback).st_uid == users["kpalice"].pw_uid
    assert alice["first"] == alice["prefix"] and alice["reused"]  # found again: by its owner, not its name
    assert run_as("kpalice", shared, _STAGE, str(shared_archive))["prefix"] == alice["prefix"]


def test_a_cache_root_a_neighbour_can_change_is_refused(users, shared, fresh_root, shared_archive):
    # TMPDIR=/tmp/$USER made first by bob: he could swap alice's private dir for his own env.
    bobs = fresh_root / "kpalice"
    bobs.mkdir()
    os.chmod(bobs, 0o777)
    os.chown(bobs, users["kpbob"].pw_uid, users["kpbob"].pw_gid)

    alice = run_as("kpalice", shared, _STAGE, str(shared_archive), KERNELPROV_CACHE_DIR=str(bobs))

    assert alice["error"] == (f"The kernelprov cache root {bobs} is unsafe: it is owned by another user (kpbob), so they could "
                              "replace your environments; set KERNELPROV_CACHE_DIR to a directory on a local disk that only you "
                              "(or root) can change.")
    assert os.listdir(bobs) == []


@pytest.mark.skipif(not (shutil.which("mksquashfs") and shutil.which("squashfuse") and shutil.which("fusermount3")
                         and os.path.exists("/dev/fuse")), reason="image mode needs squashfs-tools, squashfuse and fuse3")
def test_a_squatted_directory_cannot_block_image_mode(users, shared, fresh_root, tiny_env, tmp_path):
    import conda_pack

    from kernelprov.engine.manifest import manifest_for, write_manifest

    alice = users["kpalice"]
    # alice's runtime dir, as logind makes /run/user/<uid>: only she can create anything in it.
    runtime = shared["archives"].parent / "run-kpalice"
    runtime.mkdir()
    os.chown(runtime, alice.pw_uid, alice.pw_gid)
    os.chmod(runtime, 0o700)
    mount_point = runtime / "kernelprov" / "tiny.a1b2c3.img"  # what `kernelprov pack` bakes for her
    archive = shared["archives"] / "alice-tiny.squashfs"
    conda_pack.pack(prefix=str(tiny_env), output=str(archive), format="squashfs", dest_prefix=str(mount_point))
    os.chmod(archive, 0o644)
    write_manifest(archive, manifest_for(archive, dest_prefix=str(mount_point)))
    # bob squats every name in the shared places he can reach.
    for squat in (fresh_root / "kernelprov-kpalice", fresh_root / "kpalice"):
        squat.mkdir()
        os.chown(squat, users["kpbob"].pw_uid, users["kpbob"].pw_gid)

    code = _STAGE.replace('str(ensure_staged(sys.argv[1]).prefix)',
                          'str(ensure_staged(sys.argv[1]).prefix), "hello": __import__("subprocess").run('
                          '[ensure_staged(sys.argv[1]).prefix / "bin/hello"], capture_output=True, text=True).stdout')
    try:
        staged = run_as("kpalice", shared, code, str(archive), XDG_RUNTIME_DIR=str(runtime))
        assert "error" not in staged, staged
        assert staged["prefix"] == str(mount_point) and staged["hello"] == f"hello from {mount_point}\n"
        target = Path(os.readlink(mount_point))
        assert target.parent.parent == fresh_root and target.parent.name.startswith("kernelprov-kpalice.")
        assert os.lstat(mount_point).st_uid == alice.pw_uid
    finally:
        run_as("kpalice", shared, "import json; from kernelprov.engine.inventory import clean; clean(); print(json.dumps({}))",
               XDG_RUNTIME_DIR=str(runtime))
        with open("/proc/mounts") as mounts:
            for point in [line.split()[1] for line in mounts if line.split()[1].startswith(str(fresh_root))]:
                subprocess.run(["fusermount3", "-u", "-z", point], check=False, timeout=30)


def test_an_archive_you_cannot_read_gives_a_clear_error(users, shared, fresh_root, shared_archive):
    private = shared["archives"] / "alice-only.tar.gz"
    shutil.copy2(shared_archive, private)
    os.chown(private, users["kpalice"].pw_uid, users["kpalice"].pw_gid)
    os.chmod(private, 0o600)

    bob = run_as("kpbob", shared, _STAGE, str(private))

    assert bob["error"] == (f"The environment archive {private} is not readable by you; "
                            "ask its owner to make it readable (chmod a+r).")
    assert "prefix" not in bob
