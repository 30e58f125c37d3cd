"""The `hetserve` command: click verbs only; the work lives in the packages they call.

group.py     the command group (`main`)
options.py   options and parsing the verbs share
daemons.py   leader, join, up
clients.py   generate, status, bench
planning.py  profile, plan
tools.py     config show, convert, keygen
"""

from ..settings_file import name_envvars
from . import clients, daemons, planning, tools  # noqa: F401 (each registers its verbs with main)
from .daemons import local_host_devices
from .group import main

name_envvars(main)  # once every verb is registered

__all__ = ["main", "local_host_devices"]
