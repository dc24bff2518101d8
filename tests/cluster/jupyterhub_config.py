"""JupyterHub on the test's one-node Slurm cluster: batchspawner's SlurmSpawner, all on loopback.

Started by tests/test_cluster.py as ``jupyterhub -f jupyterhub_config.py`` with
``KERNELPROV_CI_HUB_SETTINGS`` naming a JSON file of the run's ports, paths and token. Apart from
the loopback and test-only parts it is the set-up the README's "JupyterHub on Slurm" section
describes: the single-user servers come from one shared environment every user can execute, and a
batch-script prologue pre-warms the global kernelprov kernel while the server starts.
"""

import json
import os

from batchspawner import SlurmSpawner
from traitlets import Unicode

settings = json.loads(open(os.environ["KERNELPROV_CI_HUB_SETTINGS"]).read())
venv_bin = os.path.join(settings["venv"], "bin")


class LoopbackSlurmSpawner(SlurmSpawner):
    """SlurmSpawner whose servers listen on 127.0.0.1.

    batchspawner resets ``ip`` to its trait's *default* (``0.0.0.0``) at every start, so a
    configured value would be ignored: the default itself is changed here.
    """

    ip = Unicode("127.0.0.1")


c = get_config()  # noqa: F821 (provided by JupyterHub when it loads this file)

c.JupyterHub.bind_url = f"http://127.0.0.1:{settings['proxy_port']}/"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
c.JupyterHub.db_url = f"sqlite:///{settings['state']}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{settings['state']}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = f"{settings['state']}/jupyterhub.pid"
# Nobody logs in through the browser here: the test acts through the REST API with a service token.
c.JupyterHub.authenticator_class = "null"
# The test cancels the jobs itself at the end; the hub need not stop each server on its way out.
c.JupyterHub.cleanup_servers = False
# configurable-http-proxy is started (and stopped) by the test, by PID.
c.JupyterHub.proxy_class = "configurable-http-proxy"
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{settings['proxy_api_port']}"
c.JupyterHub.services = [{"name": "kernelprov-ci", "api_token": settings["token"]}]
c.JupyterHub.load_roles = [{
    "name": "kernelprov-ci",
    "services": ["kernelprov-ci"],
    "scopes": ["admin:users", "admin:servers", "admin:server_state", "access:servers", "list:users", "read:users"],
}]

c.JupyterHub.spawner_class = LoopbackSlurmSpawner
# The hub runs as root and submits each user's job as that user.
c.SlurmSpawner.exec_prefix = "/usr/sbin/runuser -u {username} --"
c.SlurmSpawner.batchspawner_singleuser_cmd = os.path.join(venv_bin, "batchspawner-singleuser")
c.Spawner.cmd = [os.path.join(venv_bin, "jupyterhub-singleuser")]
c.SlurmSpawner.req_partition = settings["partition"]
c.SlurmSpawner.req_nprocs = "1"
c.SlurmSpawner.req_runtime = "00:30:00"
# Pre-warm: stage the global kernel's env on the node while the server starts (README, "Pre-warm").
c.SlurmSpawner.req_prologue = f"{venv_bin}/kernelprov unpack --quiet {settings['archive']} >/dev/null &"
# squeue names the node; its servers are reached on loopback.
c.SlurmSpawner.state_exechost_exp = "127.0.0.1"
c.SlurmSpawner.startup_poll_interval = 0.5
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
# What the job gets (batchspawner passes these with sbatch --export): the global kernels dir, and
# a node-local TMPDIR shared by every user like /tmp, where each user's kernelprov cache is made.
c.Spawner.environment = {
    "JUPYTER_PATH": settings["jupyter_path"],
    "TMPDIR": settings["node_local"],
    "SLURM_CONF": settings["slurm_conf"],
}
