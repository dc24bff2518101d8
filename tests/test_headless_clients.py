"""Where no "Error Starting Kernel" dialog is shown (nbclient, papermill, scripts), a failed
stage still reaches the user as the same one sentence: the provisioner raises it from the start.

kernelprov deliberately starts no stand-in kernel that prints the error on each execute (as
pixi-kernel's fallback kernel does): a notebook run by nbclient or papermill would then "start",
run every cell into the same error and report cell failures instead of the cause, and the
server's restarter and health checks would see a live kernel. The README says so.
"""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from kernelprov.cli.app import main


@pytest.fixture
def damaged_kernel(kernel_environ, copy_archive, tiny_archives, capsys):
    archive = copy_archive(tiny_archives["tar.gz"], "broken.tar.gz")
    assert main(["install", "broken", "--archive", str(archive), "--display-name", "Python (broken)"]) == 0
    capsys.readouterr()
    data = bytearray(archive.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damaged inside, the size as packed
    archive.write_bytes(bytes(data))
    return archive


def test_nbclient_reports_the_one_sentence_of_a_failed_stage(damaged_kernel):
    stager = subprocess.run([sys.executable, "-m", "kernelprov", "unpack", "--quiet", str(damaged_kernel)],
                            capture_output=True, text=True, timeout=120)
    sentence = stager.stderr.strip().removeprefix("kernelprov: error: ")
    assert stager.returncode != 0 and sentence

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('never runs')")])
    with pytest.raises(Exception) as raised:
        NotebookClient(notebook, kernel_name="broken", startup_timeout=60).execute()

    assert sentence in str(raised.value)
    assert notebook.cells[0].outputs == []  # no stand-in kernel ran the cell into an error
