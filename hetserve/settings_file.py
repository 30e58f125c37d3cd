"""Settings from a TOML file and HETSERVE_* environment variables, beneath the command line.

Precedence, highest first: command-line option > environment variable > config file > default.
click implements exactly this order (COMMANDLINE > ENVIRONMENT > DEFAULT_MAP > DEFAULT), so the
file becomes the command's `default_map` and the environment is click's auto_envvar_prefix:
`HETSERVE_<COMMAND>_<OPTION>`, e.g. HETSERVE_LEADER_MAX_SEQS=16 or HETSERVE_JOIN_DEVICE=cuda:1.

The file holds one table per command, and top-level keys that apply to every command that has
such an option:

    log_level = "info"
    [leader]
    listen = "0.0.0.0:5555"
    hosts = 2
    [join]
    leader = "10.0.0.1:5555"
    device = "cuda:0"

Keys and environment variables are named for the option's flag (`--plan` is `plan` and
HETSERVE_LEADER_PLAN), with '_' or '-'. An unknown key or table, or a value of the wrong type, is
an error that names the key and the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import click

ENV_PREFIX = "HETSERVE"


def load_config_file(ctx: click.Context, param: click.Parameter, path: str | None) -> str | None:
    """Eager callback of --config: install the file's values as this command's defaults."""
    if not path:
        return path
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", ctx, param) from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}", ctx, param) from None
    options = _options_by_key(ctx.command)
    commands = _commands(ctx.find_root().command)
    known = {key for command in commands.values() for key in _options_by_key(command)}
    for table, value in data.items():
        if isinstance(value, dict) and table not in commands:
            raise click.BadParameter(f"{path}: [{table}] is not a command; tables: "
                                     f"{', '.join(sorted(commands))}", ctx, param)
        if not isinstance(value, dict) and _key(table) not in known:
            raise click.BadParameter(f"{path}: {table!r} is no command's option", ctx, param)
    section = data.get(ctx.info_name, {})
    if not isinstance(section, dict):
        raise click.BadParameter(f"{path}: [{ctx.info_name}] must be a table", ctx, param)
    values = {k: v for k, v in data.items() if not isinstance(v, dict)}
    values.update(section)
    defaults = {}
    for key, value in values.items():
        option = options.get(_key(key))
        if option is None:
            if key in section:
                raise click.BadParameter(f"{path}: [{ctx.info_name}] has no option {key!r}; "
                                         f"known: {', '.join(sorted(flag_key(o) for o in options.values()))}",
                                         ctx, param)
            continue  # a top-level key for other commands
        try:
            defaults[option.name] = option.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise click.BadParameter(f"{path}: {key}: {exc.message}", ctx, param) from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["hetserve.config_file"] = path
    return path


def _key(name: str) -> str:
    return name.replace("-", "_")


def flag_key(option: click.Option) -> str:
    """The name an option goes by in files and the environment: its first long flag (`--plan-file`
    would be plan_file), else its parameter name."""
    flags = [o for o in option.opts if o.startswith("--")]
    return _key(flags[0][2:]) if flags else option.name


def _options_by_key(command: click.Command) -> dict[str, click.Option]:
    """A command's options by flag key and by parameter name (both are accepted in files)."""
    options = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name not in ("config", "help"):
            options[p.name] = options[flag_key(p)] = p
    return options


def _commands(group: click.Command) -> dict[str, click.Command]:
    """Every command under the root group by name (nested groups' too)."""
    found = {}
    for name, command in getattr(group, "commands", {}).items():
        found[name] = command
        found.update(_commands(command))
    return found


def name_envvars(group: click.Group, prefix: str = ENV_PREFIX) -> None:
    """Name each option's environment variable for its flag, HETSERVE_<COMMAND>_<FLAG>: click's own
    names come from the parameter, and `--plan` (parameter plan_file) would be
    HETSERVE_LEADER_PLAN_FILE, which nobody reading `--help` guesses."""
    for name, command in getattr(group, "commands", {}).items():
        for p in command.params:
            if isinstance(p, click.Option) and p.envvar is None and p.name not in ("config", "help"):
                p.envvar = f"{prefix}_{name}_{flag_key(p)}".upper().replace("-", "_")
        name_envvars(command, f"{prefix}_{name}")


def config_option(func):
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=load_config_file,
                        help="TOML file of settings (see README 'Configuration'); "
                             "command line > HETSERVE_* env > file > default.")(func)


def effective_settings(ctx: click.Context) -> list[tuple[str, object, str]]:
    """(option, value, where it came from) for every option of a parsed command context."""
    rows = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in ("config", "help") or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is click.core.ParameterSource.COMMANDLINE:
            where = "command line"
        elif source is click.core.ParameterSource.ENVIRONMENT:
            where = f"env {param.envvar or f'{ctx.auto_envvar_prefix}_{param.name.upper()}'}"
        elif source is click.core.ParameterSource.DEFAULT_MAP:
            where = f"file {ctx.meta.get('hetserve.config_file')}"
        else:
            where = "default"
        rows.append((flag_key(param), ctx.params.get(param.name), where))
    return rows

