"""``python -m kernelprov``: the CLI, used by run.sh to stage an env without the provisioner."""

from .app import run

run()
