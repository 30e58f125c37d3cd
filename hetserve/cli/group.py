"""The `hetserve` command group that every verb registers with."""

from __future__ import annotations


import click

from ..settings_file import ENV_PREFIX


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                                "auto_envvar_prefix": ENV_PREFIX})
def main():
    """hetserve: serve one LLM across a heterogeneous set of hosts.

    Start a leader, join hosts to it, and talk to it with the line protocol
    (`hetserve generate`). `hetserve up` runs a whole cluster on this machine.

    Every option can also come from a TOML file (--config) or an environment
    variable HETSERVE_<COMMAND>_<OPTION>; the command line wins, then the
    environment, then the file. `hetserve config show COMMAND` prints the result.
    """
