"""kernelprov inside Jupyter: the kernel provisioner, kernelspecs, and the panel's server extension.

Sits on top of :mod:`kernelprov.engine` and :mod:`kernelprov.config`; imports nothing from
:mod:`kernelprov.cli`. Modules:

``provisioner``   ``KernelprovProvisioner`` (entry point ``kernelprov-provisioner``)
``kernelspecs``   the HiPerGator ``template_kernel`` layout: build, write, place, find, remove
``install``       ``install_kernel()``: pack (or take) an archive and place its kernelspec
``environments``  what the panel shows and does, as plain Python (no Tornado)
``routes``        the REST handlers and the one route table
``serverext``     the jupyter_server extension loader
"""
