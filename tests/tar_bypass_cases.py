"""The tarfile extraction-filter bypasses of 2025-2026, each built byte by byte as an archive.

Shared by ``tests/test_tar_bypasses.py``, which stages every case through ``ensure_staged`` under
the venv's Python, and by that file's run of this module as a script under Debian's
``/usr/bin/python3`` (3.11.2, which has no ``tarfile.data_filter`` at all, so only kernelprov's own
checks stand between an archive and the disk)::

    PYTHONPATH=<checkout> /usr/bin/python3 tests/tar_bypass_cases.py <empty work dir>

It imports nothing beyond the standard library and :mod:`kernelprov.engine.extract`, and prints
one JSON object per case. Every attack is aimed, through relative paths that a vulnerable
extractor would follow, at a directory ``outside`` next to the cache, which holds one victim
file ``secret`` (mode 0600); each run checks that ``outside`` and the rest of the work dir are
exactly as they were. Where the interpreter has ``tarfile.data_filter`` (3.11.4+), kernelprov also
asks it about links, and it may be the one that refuses a chain first: :meth:`Case.refused_as_expected`
then accepts its wording too.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BLOCK = 512
SECRET = b"the victim's private data\n"


def header(name: str, typeflag: bytes = b"0", size: int = 0, *, linkname: str = "", mode: int = 0o644) -> bytes:
    """One ustar header block, with exactly the fields given (no consistency fixed up)."""
    block = bytearray(BLOCK)
    block[0:100] = name.encode().ljust(100, b"\0")[:100]
    block[100:108] = b"%07o\0" % mode
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_600_000_000
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname.encode().ljust(100, b"\0")[:100]
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def pax(records: dict[str, str], typeflag: bytes = b"x") -> bytes:
    """A pax extended header (``x``, or global ``g``) holding ``records``."""
    body = b""
    for key, value in records.items():
        record = f" {key}={value}\n".encode()
        length = len(record) + 1
        while len(str(length)) + len(record) != length:
            length = len(str(length)) + len(record)
        body += str(length).encode() + record
    return header("././@PaxHeader", typeflag, len(body)) + padded(body)


def file(name: str, data: bytes = b"x\n", mode: int = 0o644) -> bytes:
    return header(name, b"0", len(data), mode=mode) + padded(data)


def symlink(name: str, target: str) -> bytes:
    return header(name, b"2", linkname=target, mode=0o777)


def hardlink(name: str, target: str, mode: int = 0o644) -> bytes:
    return header(name, b"1", linkname=target, mode=mode)


def directory(name: str) -> bytes:
    return header(name.rstrip("/") + "/", b"5", mode=0o755)


def tar(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * (2 * BLOCK)


@dataclass
class Case:
    """One attack: ``build(outside)`` returns the archive's bytes given the relative path from the
    extraction dir to ``outside``; ``refusal`` is a text the refusal must contain, or None when
    kernelprov is unaffected and ``check(tree)`` says so (returns "" when all is well)."""

    name: str
    doc: str
    build: Callable[[str], bytes]
    refusal: str | None
    check: Callable[[Path], str] | None = None
    #: Does ``tarfile`` without a filter (the default before 3.14) write or chmod outside with it?
    #: Proves the attack is aimed at the directory the tests watch.
    lands_outside_naively: bool = False

    def refused_as_expected(self, message: str) -> bool:
        """Does ``message`` refuse this case for the right reason? (The standard library's
        filter, asked second about links, words its refusals "... is unsafe (...)".)"""
        if self.refusal is None:
            return message == "unaffected"
        return message.startswith("Refusing ") and (self.refusal in message or "is unsafe (" in message)


def _deep(outside: str) -> str:
    """A link name exactly as deep as ``outside`` climbs, so that ``outside`` seen from it stays inside."""
    return "/".join(["d"] * outside.split("/").count("..") + ["l"])


def _chain(outside: str) -> list[bytes]:
    """Links each inside on its own; ``a/c`` resolves, physically, to ``outside``."""
    links = [symlink("a/b1", "..")]  # a/.. : the extraction dir itself
    ups = outside.split("/").count("..")
    for i in range(2, ups + 2):
        links.append(symlink(f"a/b{i}", f"b{i - 1}/.."))  # lexically a/, physically one more level up
    rest = "/".join(p for p in outside.split("/") if p != "..")
    links.append(symlink("a/c", f"b{ups + 1}/{rest}"))
    return links


def _tool_mode_kept(tree: Path) -> str:
    mode = stat.S_IMODE(os.lstat(tree / "bin/tool").st_mode)
    return "" if mode == 0o644 else f"bin/tool became {oct(mode)}"


def _signed_size(member: bytes, size: int) -> bytes:
    """``member``'s first header with ``size`` written as signed octal (checksum fixed up), and no data."""
    block = bytearray(member[:BLOCK])
    block[124:136] = b"-%010o\0" % -size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _nested(outside: str) -> bytes:
    """An archive hidden inside a member's data: what a reader that mis-sizes the member sees."""
    return tar(file(f"{outside}/smuggled"), file("bin/python", b"#!/bin/sh\necho smuggled\n", 0o755))[:-2 * BLOCK]


CASES = [
    Case("hardlink-to-deeper-symlink",
         "CVE-2026-11940: a hard link to a symlink that is inside only at its own depth; tarfile "
         "re-creates the symlink at the hard link's shallower place, where it escapes.",
         lambda o: tar(symlink(_deep(o), o), hardlink("h", _deep(o)), file("h/planted")),
         "'h' is a hard link to something that is not a file in it", lands_outside_naively=True),
    Case("hardlink-to-symlink-chmod",
         "CVE-2026-82049: a hard link (mode 0777) to a symlink aimed at the victim's file: chmod "
         "through the link would expose it.",
         lambda o: tar(symlink(_deep(o), f"{o}/secret"), hardlink("h", _deep(o), mode=0o777)),
         "'h' is a hard link to something that is not a file in it", lands_outside_naively=True),
    Case("hardlink-through-symlinked-dir",
         "CVE-2026-82049: a hard link whose target path runs through a symlinked directory "
         "would link the victim's file into the env (tarfile finds link targets by member name, "
         "extractors that link by path, as GNU tar does, follow the directory link).",
         lambda o: tar(symlink(_deep(o), o), hardlink("h", f"{_deep(o)}/secret")),
         "'h' is a hard link to something that is not a file in it"),
    Case("hardlink-changes-no-mode",
         "Unaffected: a hard link asking for mode 6777 to an env file; kernelprov never chmods "
         "a hard link, so the file it shares keeps its 0644 (and no setuid bit).",
         lambda o: tar(file("bin/python", b"#!/bin/sh\n", 0o755), file("bin/tool"),
                       hardlink("bin/tool-s", "bin/tool", mode=0o6777)),
         None, _tool_mode_kept),
    Case("empty-dir-dotdot",
         "CVE-2026-19672: an empty directory member whose name climbs out.",
         lambda o: tar(file("bin/ok"), directory(f"{o}/made")),
         "points outside the environment", lands_outside_naively=True),
    Case("empty-dir-through-symlink",
         "CVE-2026-19672: an empty directory created under a symlink that leads outside.",
         lambda o: tar(symlink("l", o), directory("l/made")),
         "'l' is a link to", lands_outside_naively=True),
    Case("empty-dir-through-link-chain",
         "CVE-2026-19672 with a symlink chain: each link is inside on its own, together they "
         "reach outside, and a directory is created under the last.",
         lambda o: tar(*_chain(o), directory("a/c/made")),
         "'a/c/made' would be written through a link or file", lands_outside_naively=True),
    Case("symlink-chain-escape",
         "A symlink chain whose links are each inside but resolve outside together.",
         lambda o: tar(*_chain(o)),
         "is a link that resolves outside the environment"),
    Case("symlink-to-escaping-symlink",
         "A harmless-looking link to a link that escapes, then a file written through both.",
         lambda o: tar(symlink("a", "b"), symlink("b", o), file("a/planted")),
         "'b' is a link to", lands_outside_naively=True),
    Case("symlink-replaced-by-escaping-duplicate",
         "A duplicate member replaces an inside link with an escaping one (tar's last one wins), "
         "then a file is written through it.",
         lambda o: tar(symlink("l", "."), symlink("l", o), file("l/planted")),
         "'l' is a link to", lands_outside_naively=True),
    Case("tarmageddon-pax-size-over-zero",
         "CVE-2025-62518 (TARmageddon): pax size N, header size 0; a reader advancing by the header "
         "size sees the member's data as members (here an escaping file and a bin/python).",
         lambda o: tar(pax({"size": str(len(_nested(o)))}), header("lib/carrier", b"0", 0), padded(_nested(o))),
         "has a pax size"),
    Case("tarmageddon-header-size-over-pax-zero",
         "CVE-2025-62518 reversed: header size N, pax size 0; readers that honour pax (tarfile, "
         "and kernelprov before this check) parse the data as members.",
         lambda o: tar(pax({"size": "0"}), header("lib/carrier", b"0", len(_nested(o))), padded(_nested(o))),
         "has a pax size (0) that disagrees", lands_outside_naively=True),
    Case("link-with-data-smuggles-entries",
         "A symlink header declaring data: tarfile parses that data as the next headers, GNU tar "
         "skips it, so the archive holds different members for each.",
         lambda o: tar(header("lib/l", b"2", len(_nested(o)), linkname="x", mode=0o777), padded(_nested(o))),
         "is a symbolic link that declares", lands_outside_naively=True),
    Case("global-pax-names-every-member",
         "A global pax header giving every later member the same path.",
         lambda o: tar(pax({"path": "bin/python"}, b"g"), file("lib/a"), file("lib/b")),
         "a global pax header sets the name or size"),
    Case("pax-negative-size",
         "A negative pax size, which would move a naive reader backwards over its own headers.",
         lambda o: tar(pax({"size": "-512"}), header("lib/a", b"0", 0)),
         "has an invalid pax size"),
    Case("octal-negative-size-loops",
         "A pax header whose octal size field says -1536: Python's int(..., 8) takes the sign, and a "
         "reader that advances by it lands back on the member before and loops for ever (kernelprov "
         "before this check: a 3 kB archive held a stage, its lock and a core until killed).",
         lambda o: tar(file("lib/a"), _signed_size(pax({"mtime": "1"}), -1536), file("lib/b")),
         "holds a signed number"),
    Case("pax-header-memory-bomb",
         "A pax header declaring 1 GiB: refused before a byte of it is buffered.",
         lambda o: header("././@PaxHeader", b"x", 1 << 30) + b"\0" * 4096,
         "more than the 4 MiB such headers may hold"),
    Case("long-name-memory-bomb",
         "A GNU long-name header declaring 64 MiB.",
         lambda o: header("././@LongLink", b"L", 64 << 20) + b"\0" * 4096,
         "more than the 4 MiB such headers may hold"),
]


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path under ``root`` except ``skip`` (the extraction dir): type, mode, size, content."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path == skip:
                continue
            st = os.lstat(path)
            content = path.read_bytes() if stat.S_ISREG(st.st_mode) else os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            seen[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink, str(content))
    return seen


def run_cases(work: Path) -> list[dict]:
    """Extract every case with :func:`kernelprov.engine.extract.extract` in ``work`` (the layout
    of a real cache: ``work/cache/kernelprov-u/.staging-*`` beside ``work/outside``)."""
    import shutil

    from kernelprov.engine.extract import extract
    from kernelprov.errors import ArchiveError

    outside = work / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    os.chmod(outside / "secret", 0o600)
    user_dir = work / "cache" / "kernelprov-u"
    user_dir.mkdir(parents=True)
    results = []
    for case in CASES:
        dest = user_dir / f".staging-{case.name}"
        archive = work / f"{case.name}.tar"
        archive.write_bytes(case.build(os.path.relpath(outside, dest)))
        before = snapshot(work, dest)
        dest.mkdir()
        try:
            extract(archive, dest)
            outcome, problem = "unaffected", case.check(dest) if case.check else ""
        except ArchiveError as err:
            outcome, problem = str(err), ""
        shutil.rmtree(dest)
        archive.unlink()
        after = snapshot(work, dest)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and k != archive.name)
        results.append({"case": case.name, "outcome": outcome, "as_expected": case.refused_as_expected(outcome),
                        "problem": problem, "changed": changed})
    return results


if __name__ == "__main__":
    import tarfile

    for result in run_cases(Path(sys.argv[1])):
        print(json.dumps({**result, "python": sys.version.split()[0], "data_filter": hasattr(tarfile, "data_filter")}))
