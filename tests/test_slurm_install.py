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
    options = provisioner.sbatch_options("/x/job.log", "/work", "k")
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
    options = provisioner.sbatch_options("/x/job.log", None, "k")
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


@pytest.mark.parametrize("text, seconds", [("1-02:03:04", 93784.0), ("45:10", 2710.0), ("0:05", 5.0),
                                           ("UNLIMITED", None), ("NOT_SET", None), ("INVALID", None)])
def test_squeue_time_left_reads_as_seconds(text, seconds):
    assert jobs.parse_time_left(text) == seconds


FAKE_RUN_SH = """#!/bin/bash
# A stand-in for the kernel's run.sh: writes "ports" into its connection file, then waits.
python3 - "$2" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
info.update(shell_port=4242, iopub_port=4243, stdin_port=4244, control_port=4245, hb_port=4246)
json.dump(info, open(sys.argv[1], "w"))
PY
trap 'echo "interrupted $$"; exit 5' INT
echo "kernel $$ $2"
while true; do sleep 0.1; done
"""


def _start_launcher(tmp_path, run_sh_text: str, grace: float):
    import os
    import subprocess

    exchange = tmp_path / "exchange"
    exchange.mkdir(mode=0o700)
    (exchange / "connection.json").write_text(json.dumps({"key": "secret", "shell_port": 0}))
    run_sh = tmp_path / "run.sh"
    run_sh.write_text(run_sh_text)
    run_sh.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM")}
    with open(tmp_path / "job.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-I", "-m", "kernelprov.jupyter.slurm.launcher", str(exchange),
                                    str(run_sh), str(grace)], env=env, stdout=log, stderr=subprocess.STDOUT)
    return exchange, process


def _wait_for_status(exchange, generation: int, state: str, timeout: float = 20) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = json.loads((exchange / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("generation") == generation and status.get("state") == state:
            return status
        time.sleep(0.05)
    raise TimeoutError(f"generation {generation} never got to {state}")


def _wait_for_ports(exchange, generation: int) -> None:
    import time

    from kernelprov.jupyter.slurm.exchange import read_ports

    deadline = time.monotonic() + 20
    while read_ports(str(exchange), generation) is None:
        assert time.monotonic() < deadline, f"generation {generation} never wrote its ports"
        time.sleep(0.05)
    time.sleep(0.3)  # and set its trap


def test_the_launcher_forwards_an_interrupt_and_restarts_the_kernel_on_request(tmp_path):
    """In the job, the launcher supervises the kernel: a SIGINT reaches the kernel (not the
    launcher); after the kernel exits, a restart request starts generation 1 with its own
    connection file; without a request the job ends with the kernel's status after the grace."""
    import os
    import signal
    import stat

    from kernelprov.jupyter.slurm.exchange import read_ports, read_status, request_restart

    exchange, launcher = _start_launcher(tmp_path, FAKE_RUN_SH, grace=1.5)
    try:
        first = _wait_for_status(exchange, 0, "running")
        _wait_for_ports(exchange, 0)
        assert read_ports(str(exchange), 0)["shell_port"] == 4242 and read_ports(str(exchange), 1) is None
        launcher.send_signal(signal.SIGINT)
        exited = _wait_for_status(exchange, 0, "exited")
        assert exited["exit_code"] == 5 and launcher.poll() is None, "the launcher outlives its kernel"
        request_restart(str(exchange), 1)
        assert stat.S_IMODE(os.stat(exchange / "restart.json").st_mode) == 0o600
        second = _wait_for_status(exchange, 1, "running")
        assert second["pid"] != first["pid"]
        assert not (exchange / "connection-0.json").exists(), "generation 0's ports are gone with it"
        _wait_for_ports(exchange, 1)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(15) == 5, "no request within the grace: the job ends with the kernel's status"
        assert read_status(str(exchange))["state"] == "ended"
        out = (tmp_path / "job.log").read_text()
        assert out.count("interrupted") == 2 and "secret" not in out
        for path in exchange.iterdir():
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0 or path.name == "connection.json", path
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        kernel = (read_status(str(exchange)) or {}).get("pid")
        if kernel:  # a kernel left running by a failed assertion: its own process group
            try:
                os.killpg(kernel, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_kernel_that_never_reported_its_ports_ends_the_job_at_once(tmp_path):
    import time

    exchange, launcher = _start_launcher(tmp_path, "#!/bin/bash\necho cannot stage >&2\nexit 7\n", grace=60)
    began = time.monotonic()
    assert launcher.wait(20) == 7
    assert time.monotonic() - began < 15, "a failed start waited for a restart that cannot come"
    assert json.loads((exchange / "status.json").read_text())["state"] == "ended"
