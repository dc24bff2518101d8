"""Warn in a kernelprov kernel when a cell installs packages into the node-local copy of its env.

This file runs inside the kernel, in the packed env's Python, which has IPython, traitlets and the
standard library but no kernelprov; it imports nothing else, and nothing in kernelprov imports it.
run.sh (``kernelspecs.py``) starts ipykernel with::

    --IPKernelApp.extra_config_file=<this file>
    --IPKernelApp.extra_extensions=kernelprov_pip_warning
    --KernelprovPipWarning.kernel_name=<kernel name>

IPython executes this file as a config file after the user's own config files (which keep their
values: it sets no option), and that registers the extension below in ``sys.modules`` under
``kernelprov_pip_warning``. So loading the extension searches no directory (a directory on the
kernel's ``sys.path`` would cost a stat per import, on the shared filesystem), nothing is added to
``sys.path`` or ``PYTHONPATH`` (the user's ``!python`` and other subprocesses inherit nothing), and
the staged env's tree is untouched (it stays byte-equal to GNU tar + conda-unpack).

Why warn: ``%pip install`` in the kernel writes into the staged copy under the node's cache, which
``kernelprov cache clean`` or eviction removes and which other nodes never see; the package seems
installed today and is gone on the next node. The warning says so once per cell, on stderr, before
the install runs.
"""

import os
import re
import sys
import sysconfig
import types

EXTENSION = "kernelprov_pip_warning"

# A line that runs an installer which writes into this Python's prefix: %pip / %conda / %mamba
# magics, and shell escapes (!, !!) running pip, `python -m pip`, `{sys.executable} -m pip`,
# conda, mamba, micromamba or `uv pip` (uv installs into $CONDA_PREFIX, which run.sh sets).
_INSTALL_LINE = re.compile(
    r"^[ \t]*(?:%|!{1,2})[ \t]*"
    r"(?:(?:\S*/)?(?:pip[0-9.]*|conda|mamba|micromamba|uv[ \t]+pip)"
    r"|(?:\S*python[0-9.]*|\{[^}\n]*\})[ \t]+-m[ \t]+pip)"
    r"[ \t]+install\b(?P<args>.*)$",
    re.MULTILINE,
)
# Options that send the install somewhere other than the staged env (the user's home, a target
# directory, another conda env): no warning for those.
_ELSEWHERE = ("--user", "--target", "-t", "--prefix", "-p", "--root", "--name", "-n")


def installs_into_env(cell):
    """True when ``cell`` (a cell's raw source) runs an install into the kernel's own env.

    Called by the ``pre_run_cell`` hook; a plain function so the patterns are testable alone."""
    for match in _INSTALL_LINE.finditer(cell or ""):
        words = match.group("args").split()
        if not any(word.split("=", 1)[0] in _ELSEWHERE for word in words):
            return True
    return False


def warning_text(prefix, kernel_name):
    """The one warning, naming the staged prefix and the reinstall command."""
    reinstall = "kernelprov install %s --replace" % (kernel_name or "NAME")
    return ("kernelprov: this installs into the node-local copy of the env at %s, which is discarded "
            "when the cache is cleaned and does not exist on other nodes. To keep the package, add it "
            "to the conda env and run `%s`." % (prefix, reinstall))


def _settings_class():
    """The ``KernelprovPipWarning`` configurable (``kernel_name``, set by run.sh on the command line)."""
    from traitlets import Unicode
    from traitlets.config import Configurable

    class KernelprovPipWarning(Configurable):
        kernel_name = Unicode("", help="The kernel's name, for the reinstall command the warning shows.").tag(config=True)

    return KernelprovPipWarning


def _env_is_writable():
    # An image-mode env is a read-only squashfs mount: pip fails or falls back to --user there.
    return os.access(sysconfig.get_paths()["purelib"], os.W_OK)


def load_ipython_extension(ipython):
    """Called by IPython's extension manager at kernel start: register the ``pre_run_cell`` hook."""
    if getattr(ipython, "_kernelprov_pip_warning", None) is not None:
        return
    kernel_name = _settings_class()(parent=ipython).kernel_name

    def before_cell(info=None):
        if info is not None and installs_into_env(getattr(info, "raw_cell", "")) and _env_is_writable():
            print(warning_text(sys.prefix, kernel_name), file=sys.stderr, flush=True)

    ipython._kernelprov_pip_warning = before_cell
    ipython.events.register("pre_run_cell", before_cell)


def unload_ipython_extension(ipython):
    """Called by ``%unload_ext kernelprov_pip_warning``: stop warning."""
    hook = getattr(ipython, "_kernelprov_pip_warning", None)
    if hook is not None:
        ipython.events.unregister("pre_run_cell", hook)
        ipython._kernelprov_pip_warning = None


def _register_extension():
    """Make this file importable as the extension without a search of ``sys.path``."""
    if EXTENSION not in sys.modules:
        module = types.ModuleType(EXTENSION, __doc__)
        module.__file__ = __file__
        for name in ("installs_into_env", "warning_text", "load_ipython_extension", "unload_ipython_extension"):
            setattr(module, name, globals()[name])
        sys.modules[EXTENSION] = module


# IPython's config loader executes this file with `get_config` defined: that is the kernel start.
if "get_config" in globals():
    _register_extension()
