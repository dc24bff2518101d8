"""``python -m kernelprov``: the CLI, used by run.sh to stage an env without the provisioner."""

from .cli.app import run

run()
