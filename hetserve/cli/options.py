"""Options and parsing shared by the verbs: sizes, limits, planner settings, keys, tokens, logs."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import click

from ..config import DECODE_AHEAD, Limits, PlannerSettings
from ..model.resolve import DEFAULT_MODEL


LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
DTYPES = click.Choice(["float32", "float16", "bfloat16"])
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
LIMIT_HELP = {
    "max_seqs": "Requests running at once (KV-cache slots on every stage).",
    "max_context": "Prompt + completion tokens per request (KV-cache length per slot).",
    "default_max_tokens": "Completion length when a request gives no max_tokens.",
    "max_queued": "Requests waiting for a slot before new ones get 'overloaded'.",
    "max_queued_tokens": "Prompt tokens of the requests waiting for a slot, in all, before new ones get 'overloaded'.",
    "prefill_seqs": "Most requests in one prefill micro-batch.",
    "prefill_tokens": "Most prompt tokens in one prefill micro-batch; longer prompts are chunked.",
    "decode_seqs": "Most requests in one decode micro-batch.",
    "max_in_flight": "Micro-batches in the pipeline at once; 0 = chosen at runtime from measured stage times (one per "
                     "stage up). With decode-ahead one more is queued behind each.",
    "decode_ahead": "One-stage pipelines: queue each request's next decode step before its token is back (the stage "
                    "feeds it the token it sampled), so the stage never waits on the leader between steps. auto: "
                    "where the stage is a GPU (on a CPU the work beside the stage's threads slows it).",
    "mixed_batches": "Decode rows ride in prefill micro-batches where every stage runs rows at their own lengths "
                     "(GPU stages from CUDA graphs), so prompt tokens share the decode step's weight reads.",
}


LIMIT_CHOICES = {"decode_ahead": DECODE_AHEAD}  # Limits fields that take one of a few words


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 8GiB, 512MiB or 40G")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def keys_options(holds: str):
    """--keys and --insecure, for the two daemons that talk ZeroMQ."""
    def add(func):
        func = click.option("--insecure", is_flag=True,
                            help="Allow plain text and unauthenticated hosts beyond loopback (logged loudly).")(func)
        return click.option("--keys", default=None, type=click.Path(exists=True, file_okay=False),
                            help=f"CURVE keys directory (hetserve keygen) holding {holds}. Encrypts and "
                                 "authenticates every socket between hosts; needed beyond loopback.")(func)
    return add


def token_option(help_text: str):
    return click.option("--token-file", default=None, type=click.Path(exists=True, dir_okay=False), help=help_text)


def read_token(path: str | None) -> str | None:
    """The token in a file (surrounding whitespace ignored); None without a file."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--token-file") from None
    if not token or len(token) > 4096:
        raise click.BadParameter(f"{path} must hold one token of 1..4096 characters", param_hint="--token-file")
    return token


CLIENT_TOKEN_HELP = "File holding the server's client token (when it was started with --token-file)."


def planner_options(func):
    """Live planning options shared by `leader` and `up`."""
    options = [
        click.option("--max-ppl-increase", default=None,
                     help="Plan live from the hosts' profiles with this quality target (e.g. 2%)."),
        click.option("--plan-prompt", default=256, show_default=True, type=click.IntRange(1),
                     help="Workload prompt tokens the live plan optimizes for."),
        click.option("--plan-output", default=128, show_default=True, type=click.IntRange(1),
                     help="Workload output tokens the live plan optimizes for."),
        click.option("--plan-batch", default=8, show_default=True, type=click.IntRange(1),
                     help="Requests served together in the live plan's workload."),
        click.option("--calibration-tokens", default=512, show_default=True, type=click.IntRange(16),
                     help="Calibration tokens for layer sensitivity."),
        click.option("--plan-out", default=None, type=click.Path(dir_okay=False), help="Also write the live plan here."),
        click.option("--profile-budget", default=300.0, show_default=True, type=click.FloatRange(min=0),
                     help="Seconds a joining host without a cached profile may spend measuring one; precisions "
                          "that would run past it are left out of its profile (0 = no limit)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


PLANNER_KEYS = ("max_ppl_increase", "plan_prompt", "plan_output", "plan_batch", "calibration_tokens", "plan_out",
                "profile_budget")


def planner_from(kwargs: dict) -> PlannerSettings | None:
    values = {k: kwargs.pop(k) for k in PLANNER_KEYS}
    if values["max_ppl_increase"] is None:
        return None
    return PlannerSettings(parse_fraction(values["max_ppl_increase"]), values["plan_prompt"], values["plan_output"],
                           values["plan_batch"], values["calibration_tokens"], save_to=values["plan_out"],
                           profile_budget_s=values["profile_budget"])


def limit_options(func):
    """Add one --option per `Limits` field, defaults and help from the dataclass."""
    for field in reversed(dataclasses.fields(Limits)):
        flag = "--" + field.name.replace("_", "-")
        kind = type(field.default)
        if kind is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        elif kind is str:
            kind = click.Choice(LIMIT_CHOICES[field.name])
        func = click.option(flag, field.name, type=kind, default=field.default, show_default=True,
                            help=LIMIT_HELP[field.name])(func)
    return func


def limits_from(kwargs: dict) -> Limits:
    limits = Limits(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(Limits)})
    try:
        limits.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return limits


def log_options(func):
    func = click.option("--log-json", is_flag=True, help="Log one JSON object per line.")(func)
    return click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True,
                        help="Least severe log level written.")(func)


def apply_plan(plan_file: str, model: str, limits: Limits) -> tuple[str, int, str, Limits]:
    """A plan fixes the model, the host count, the dtype, the KV cache and the micro-batch sizes."""
    from pathlib import Path

    from ..plan.planner import Plan

    try:
        plan = Plan.load(Path(plan_file))
    except OSError as exc:
        raise click.BadParameter(f"cannot read {plan_file}: {exc.strerror or exc}", param_hint="--plan") from None
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not a plan's fields
        raise click.BadParameter(f"{plan_file} is not a plan (hetserve plan --out): {type(exc).__name__}: {exc}",
                                 param_hint="--plan") from None
    if model != DEFAULT_MODEL and model != plan.model:
        raise click.UsageError(f"--model {model} but the plan is for {plan.model}")
    batching = dict(prefill_seqs=plan.prefill_microbatch, decode_seqs=plan.decode_microbatch,
                    default_max_tokens=min(limits.default_max_tokens, plan.workload.output_tokens))
    kv = plan.workload.kv_tokens
    if kv:  # planned live (--plan-out), for the KV cache of that leader's --max-seqs and --max-context
        if limits.max_seqs * (limits.max_context + 1) > kv:
            raise click.UsageError(
                f"the plan budgeted each host's memory for {kv} KV-cache tokens a layer; --max-seqs {limits.max_seqs} "
                f"and --max-context {limits.max_context} need {limits.max_seqs * (limits.max_context + 1)}: give "
                "the limits it was planned with (max-seqs x (max-context + 1) within the budget)")
        # As the live leader ran it (leader/assignment.py): the prefill micro-batch within the
        # operator's bound, and decode micro-batches as the scheduler splits the running requests.
        batching.update(prefill_seqs=min(limits.prefill_seqs, plan.prefill_microbatch),
                        decode_seqs=limits.decode_seqs)
        return plan.model, len(plan.stages), plan.dtype, dataclasses.replace(limits, **batching)
    # Planned for its workload: the plan budgeted each host's memory for this KV cache; allocate exactly that.
    limits = dataclasses.replace(limits, max_seqs=plan.workload.batch,
                                 max_context=plan.workload.prompt_tokens + plan.workload.output_tokens, **batching)
    return plan.model, len(plan.stages), plan.dtype, limits


def run_daemon(main, settings, role: str, log_level: str, log_json: bool) -> None:
    """Run a daemon; a known failure prints one clear line and exits 1 (2 for a setting that cannot
    work: SettingsError), never a traceback."""
    from ..config import SettingsError
    from ..leader.daemon import LeaderError
    from ..lifecycle import setup_logging
    from ..model.resolve import ModelError
    import zmq

    from ..worker.host import HostError

    setup_logging(log_level, role, log_json)
    try:
        main(settings)
    except SettingsError as exc:
        click.echo(f"hetserve {role}: error: {exc}", err=True)
        sys.exit(2)
    except (LeaderError, HostError, ModelError, ValueError, OSError, zmq.ZMQError) as exc:
        click.echo(f"hetserve {role}: error: {exc}", err=True)
        sys.exit(1)



HTTP_HELP = "HOST:PORT of the OpenAI-compatible HTTP API and /metrics (off unless given)."


def parse_host(text: str) -> tuple[str, int, str | None]:
    """NAME=MEMORY[@PROFILE.json] -> (name, bytes, profile path)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{text!r} is not NAME=MEMORY[@PROFILE.json]")
    memory, _, profile = rest.partition("@")
    return name, parse_size(memory), profile or None


def parse_fraction(text: str) -> float:
    """2% or 0.02. A bare number of 1 or more is refused: `2` would be 200 %, where 2 % was meant."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a fraction like 2% or 0.02") from None
    if not (0 <= value < float("inf")):
        raise click.BadParameter(f"{text!r} is not a fraction of 0 or more")
    if value >= 1 and not text.endswith("%"):
        raise click.BadParameter(f"{text!r} would be {value:.0%}: write {text}% for percent, or a fraction below 1 "
                                 "such as 0.02")
    return value
