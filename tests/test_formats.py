"""The one formats table: every reader of a format name agrees with it."""

from __future__ import annotations

import pytest

from kernelprov.cli import arguments
from kernelprov.engine import formats
from kernelprov.engine.cache import CacheEntry
from kernelprov.engine.pack import PACK_FORMATS
from kernelprov.errors import ArchiveError


@pytest.mark.parametrize("fmt", formats.FORMATS, ids=lambda f: f.name)
def test_names_suffixes_and_magic_agree(fmt, tmp_path):
    for suffix in fmt.suffixes:
        assert formats.format_from_name(f"env{suffix}") == fmt.name
        assert formats.strip_suffix(f"env{suffix}") == "env"
        entry = CacheEntry("k", tmp_path, f"/apps/env{suffix}", 1, 1, 1, 1, 0.0, 0.0)
        assert entry.name == "env"
    assert formats.archive_file_name("env", fmt.name) == f"env{fmt.suffixes[0]}"
    sample = tmp_path / "sample"
    head = fmt.magic[0] if fmt.magic else b"\0" * 257 + b"ustar\x0000"
    sample.write_bytes(head + b"\0" * 600)
    assert formats.detect_format(sample) == fmt.name


def test_the_cli_and_pack_offer_the_table():
    choices = {}
    for action in arguments.parser()._subparsers._group_actions[0].choices.values():
        for option in action._actions:
            if "--format" in option.option_strings:
                choices[action.prog] = tuple(option.choices)
    assert set(choices.values()) == {formats.FORMAT_NAMES} and len(choices) == 2
    assert PACK_FORMATS == formats.FORMAT_NAMES and formats.DEFAULT_FORMAT == formats.FORMAT_NAMES[0]


def test_a_file_that_is_no_archive_is_named_with_every_suffix(tmp_path):
    junk = tmp_path / "env.tar.gz"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(ArchiveError) as err:
        formats.detect_format(junk)
    assert all(fmt.suffixes[0] in str(err.value) for fmt in formats.FORMATS)
