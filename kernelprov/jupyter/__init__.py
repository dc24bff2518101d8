"""kernelprov inside Jupyter: the kernel provisioners, kernelspecs, and the panel's server extension.

Sits on top of :mod:`kernelprov.engine` and :mod:`kernelprov.config`; imports nothing from
:mod:`kernelprov.cli` (an import-linter contract in ``pyproject.toml``). Modules:

``provisioner``   ``KernelprovProvisioner`` (entry point ``kernelprov-provisioner``)
``slurm/``        ``KernelprovSlurmProvisioner`` (entry point ``kernelprov-slurm-provisioner``), its settings, jobs, exchange dir, registry, launcher
``transport``     how server and kernel talk: private IPC sockets, CurveZMQ or TCP
``kernelspecs``   the HiPerGator ``template_kernel`` layout: build, write, place, find, remove
``install``       ``install_kernel()``: pack (or take) an archive and place its kernelspec
``environments``  what the panel shows and does, as plain Python (no Tornado)
``statcache``     values re-read from a file only when its stat changed, for the panel's polls
``prewarm``       the panel's *Stage now*: background stages and their progress
``events``        staging events on jupyter_server's event bus
``pip_warning``   runs inside the kernel: warns when ``%pip install`` lands in the node-local copy
``routes``        the REST handlers and the one route table
``serverext``     the jupyter_server extension loader
"""
