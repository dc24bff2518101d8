"""``kernelprov install --slurm``: the kernel.json a Slurm kernel gets, and the provisioner it names.

Quick tests, no scheduler: tests/test_slurm.py runs these kernels on a real two-node cluster.
"""

from __future__ import annotations

import json
import sys

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from kernelprov.jupyter import kernelspecs
from kernelprov.jupyter.slurm import jobs
from kernelprov.jupyter.slurm.provisioner import KernelprovSlurmProvisioner, slurm_job_state


def test_install_slurm_writes_the_slurm_provisioner_and_its_settings(cli, tiny_archives, tmp_path):
    kernels = tmp_path / "kernels"
    archive = tiny_archives["tar.gz"]
    code, out, err = cli("install", "gpu", "--archive", str(archive), "--kernels-dir", str(kernels), "--slurm",
                         "--partition", "gpu", "--time", "4:00:00", "--cpus", "8", "--mem", "32G", "--gres", "gpu:1",
                         "--account", "lab")
    assert code == 0, err
    spec = json.loads((kernels / "gpu" / "kernel.json").read_text())
    provisioner = spec["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == "kernelprov-slurm-provisioner"
    assert provisioner["config"] == {"archive": str(archive), "partition": "gpu", "time_limit": "4:00:00", "cpus": "8",
                                     "memory": "32G", "gres": "gpu:1", "account": "lab", "stager": sys.executable}
    assert spec["argv"] == [str(kernels / "gpu" / "run.sh"), "-f", "{connection_file}"]
    # Listed like every kernelprov kernel.
    assert [kernel.name for kernel in kernelspecs.find_kernels([str(kernels)])] == ["gpu"]


def test_a_slurm_flag_without_slurm_is_refused(cli, tiny_archives, tmp_path):
    code, _out, err = cli("install", "x", "--archive", str(tiny_archives["tar.gz"]), "--kernels-dir",
                          str(tmp_path / "k"), "--partition", "gpu")
    assert code != 0 and "--partition apply to Slurm kernels only; add --slurm." in err
    assert not (tmp_path / "k" / "x").exists()


def test_the_kernelspec_builds_the_slurm_provisioner_with_its_config(cli, tiny_archives, tmp_path):
    kernels = tmp_path / "kernels"
    cli("install", "k", "--archive", str(tiny_archives["tar.gz"]), "--kernels-dir", str(kernels), "--slurm", "--cpus", "2")
    km = AsyncKernelManager(kernel_name="k", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance("kid", km.kernel_spec, parent=km)
    assert isinstance(provisioner, KernelprovSlurmProvisioner)
    assert provisioner.cpus == "2" and provisioner.archive == str(tiny_archives["tar.gz"])
    options = provisioner._sbatch_options("/x/job.log", "/work")
    assert "--export=NONE" in options and "--cpus-per-task=2" in options and "--chdir=/work" in options
    assert not provisioner.has_process and slurm_job_state("kid") is None


@pytest.mark.parametrize("state, reason, node, shown", [
    ("PENDING", "Resources", "", "Pending: Resources"),
    ("RUNNING", "None", "n1", "Running on n1"),
    ("NODE_FAIL", "NodeDown", "n1", "Node fail: NodeDown"),
])
def test_job_states_read_as_one_line(state, reason, node, shown):
    assert jobs.JobState("7", state, reason, node).describe() == shown


def test_site_config_sets_what_the_kernelspec_leaves_out(cli, tiny_archives, tmp_path):
    """c.KernelprovSlurmProvisioner.* in the server's config applies; kernel.json's own settings win."""
    from traitlets.config import Config

    kernels = tmp_path / "kernels"
    cli("install", "k", "--archive", str(tiny_archives["tar.gz"]), "--kernels-dir", str(kernels), "--slurm", "--cpus", "2")
    site = Config({"KernelprovSlurmProvisioner": {"partition": "interactive", "cpus": "1", "launch_timeout": 60.0,
                                                  "extra_sbatch_options": ["--qos=jupyter"]}})
    km = AsyncKernelManager(config=site, kernel_name="k", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance("kid", km.kernel_spec, parent=km)
    assert (provisioner.partition, provisioner.cpus, provisioner.launch_timeout) == ("interactive", "2", 60.0)
    options = provisioner._sbatch_options("/x/job.log", None)
    assert "--partition=interactive" in options and options[-1] == "--qos=jupyter"


def test_the_launcher_writes_private_files_atomically(tmp_path):
    import os
    import stat

    from kernelprov.jupyter.slurm.launcher import write_private_json

    target = tmp_path / "connection.json"
    write_private_json(str(target), {"key": "k"})
    assert json.loads(target.read_text()) == {"key": "k"}
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [path.name for path in tmp_path.iterdir()] == ["connection.json"]
