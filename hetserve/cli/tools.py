"""Housekeeping verbs: `config show`, `convert`, `keygen`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from ..settings_file import effective_settings
from .group import main


@main.group()
def config():
    """Inspect settings."""


@config.command("show", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", type=click.Choice(
    ["leader", "join", "up", "generate", "status", "bench", "profile", "plan"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def config_show(ctx, command, args):
    """Print COMMAND's effective settings and where each came from.

    ARGS are COMMAND's own options, e.g. `hetserve config show leader --config /etc/hetserve/leader.toml`.
    """
    cmd = main.commands[command]
    with cmd.make_context(command, list(args), parent=ctx.find_root()) as sub:
        rows = effective_settings(sub)
    width = max(len(name) for name, _, _ in rows)
    for name, value, where in rows:
        click.echo(f"{name.ljust(width)}  {json.dumps(value)!s:24}  {where}")


@main.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path())
def convert(src, dst):
    """Convert a GGUF file SRC into a safetensors model directory DST (once; loads ~100x faster)."""
    from ..model.resolve import ModelError, convert_gguf

    try:
        convert_gguf(Path(src), Path(dst))
    except ModelError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # a destination that cannot be made: under a file, read-only, a full disk
        click.echo(f"error: cannot write {dst}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    click.echo(f"wrote {dst}")


if __name__ == "__main__":
    main()


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Whose keys: `leader`, or a host's name (files NAME.key, NAME.key_secret).")
@click.option("--force", is_flag=True, help="Replace an existing key pair of NAME (peers holding its public key "
              "must get the new one).")
def keygen(directory, name, force):
    """Make a CURVE key pair for --keys: NAME.key (public, to share) and NAME.key_secret (keep it here).

    On the leader: its leader.key_secret, and every host's public key in DIRECTORY/hosts/.
    On a host: its own NAME.key_secret and the leader's leader.key."""
    from ..transport.security import keygen as make_keys

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise click.BadParameter("use letters, digits, '.', '_' or '-'", param_hint="--name")
    existing = [p for p in (Path(directory) / f"{name}.key", Path(directory) / f"{name}.key_secret") if p.exists()]
    if existing and not force:
        click.echo(f"error: {existing[0]} exists; replacing it locks out every peer that holds the old public key "
                   "(pass --force to do it anyway)", err=True)
        sys.exit(1)
    try:
        public, secret = make_keys(Path(directory), name)
    except OSError as exc:
        click.echo(f"error: cannot write keys into {directory}: {exc.strerror}", err=True)
        sys.exit(1)
    click.echo(f"public key: {public} (give it to the peers)\nsecret key: {secret} (keep it here, mode 0600)")
