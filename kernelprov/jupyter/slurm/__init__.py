"""Kernels on compute nodes: the Slurm provisioner and the job-side launcher.

``jobs``         Slurm's own tools as plain functions: ``sbatch``, ``scontrol show job``, ``scancel``
``provisioner``  ``KernelprovSlurmProvisioner`` (entry point ``kernelprov-slurm-provisioner``) and
                 :func:`~.provisioner.slurm_job_state`, what the panel shows for a Slurm kernel
``launcher``     runs inside the job on the compute node: finds the node's address and hands over to
                 the kernel's ``run.sh``, which stages the env on the node's local disk

The provisioner runs where the Jupyter server runs (a login or service node); only ``launcher``
and ``run.sh`` run on the compute node.
"""
