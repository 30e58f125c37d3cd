"""Verbs that measure and plan: `profile` and `plan`."""

from __future__ import annotations

import sys

import click

from ..model.resolve import DEFAULT_MODEL
from ..settings_file import config_option
from .group import main
from .options import DTYPES, parse_fraction, parse_host


@main.command()
@config_option
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model to profile.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Compute dtype to profile.")
@click.option("--remeasure", is_flag=True, help="Measure again even if a cached profile exists.")
@click.option("--validate", is_flag=True, help="Measure held-out points and print the cost model's error.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the profile here (JSON).")
def profile(model, device, dtype, remeasure, validate, out):
    """Measure per-layer time and memory of each precision on this device (cached)."""
    from pathlib import Path

    from ..plan.profile import cached_profile
    from ..plan.validate import validate_cost_model

    files = resolve_model_or_exit(model)
    prof, path = cached_profile(files.path, device, dtype, remeasure=remeasure)
    click.echo(f"profile of {prof.device_name} for {model} ({dtype}): {path}")
    if out:
        prof.save(Path(out))
    click.echo(f"{'precision':10} {'layer MiB':>9}  prefill ms/layer (batch x prompt)      decode ms/layer (batch x context)")
    for p, nbytes in prof.layer_bytes.items():
        pre = " ".join(f"{b}x{t}:{prof.layer_ms['prefill'][p][i][j]:.2f}" for i, b in enumerate(prof.prefill.batches)
                       for j, t in enumerate(prof.prefill.tokens))
        dec = " ".join(f"{b}x{t}:{prof.layer_ms['decode'][p][i][j]:.2f}" for i, b in enumerate(prof.decode.batches)
                       for j, t in enumerate(prof.decode.tokens))
        click.echo(f"{p:10} {nbytes / 2**20:9.2f}  {pre}   {dec}")
    if validate:
        rows = validate_cost_model(files.path, prof)
        for phase, precision, batch, tokens, predicted, measured in rows:
            click.echo(f"held out {phase:7} {precision:6} batch {batch:2} tokens {tokens:4}: "
                       f"predicted {predicted:7.3f} ms, measured {measured:7.3f} ms ({predicted / measured - 1:+.0%})")
        errors = [abs(r[4] / r[5] - 1) for r in rows]
        click.echo(f"cost model error on {len(rows)} held-out points: mean {sum(errors) / len(errors):.1%}, "
                   f"max {max(errors):.1%}")


@main.command()
@config_option
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model to plan for.")
@click.option("--model-config", default=None,
              help="Plan offline from a config alone, no weights (needs --cluster): a built-in name (opt-30b, "
                   "opt-66b, bloom-176b, llama-3-8b, llama-3-70b) or a config.json; quality is then a prior.")
@click.option("--host", "host_specs", multiple=True,
              help="NAME=MEMORY[@PROFILE.json], once per host (default profile: this device's).")
@click.option("--cluster", "cluster_file", default=None, type=click.Path(dir_okay=False),
              help="A cluster file (examples/clusters/*.toml) instead of --host: hosts by device kind, with "
                   "predicted profiles, and the workload unless given here.")
@click.option("--device", default="cpu", show_default=True, help="Device profiled for hosts without @PROFILE.")
@click.option("--link-gbps", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Bandwidth of the links between stages.")
@click.option("--prompt", default=256, show_default=True, type=click.IntRange(1), help="Workload prompt tokens.")
@click.option("--output", default=128, show_default=True, type=click.IntRange(1), help="Workload output tokens.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1), help="Requests served together.")
@click.option("--max-ppl-increase", default="2%", show_default=True, help="Quality target: most perplexity increase.")
@click.option("--precisions", default=None,
              help="Comma-separated precisions the plan may use, e.g. native,int8 (default: all the hosts run).")
@click.option("--max-orders", default=None, type=click.IntRange(0),
              help="Most distinct host orders (of every subset of the hosts) searched exactly (default 120); past "
                   "it, only the k hosts of most memory for every k, largest first and the reverse, and the plan "
                   "states its gap to an order-free lower bound.")
@click.option("--layer-group", default=1, show_default=True, type=click.IntRange(1),
              help="Plan in groups of this many consecutive layers (one host and precision each): a smaller, "
                   "coarser search.")
@click.option("--calibration-tokens", default=512, show_default=True, type=click.IntRange(16),
              help="Tokens of calibration text for layer sensitivity and --verify.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the plan here (JSON).")
@click.option("--verify", is_flag=True, help="Measure the planned precisions' perplexity.")
@click.option("--show", default=None, type=click.Path(dir_okay=False),
              help="Draw the plan into this PNG (needs matplotlib).")
@click.pass_context
def plan(ctx, model, model_config, host_specs, cluster_file, device, link_gbps, prompt, output, batch, max_ppl_increase,
         precisions, max_orders, layer_group, calibration_tokens, out, verify, show):
    """Plan layers, precisions and micro-batch sizes for hosts under a quality target."""
    from dataclasses import replace
    from pathlib import Path

    from ..model.precision import PRECISIONS
    from ..plan.grouping import make_grouped_plan
    from ..plan.planner import PlanningError, Workload
    from ..plan.quality import measure_ppl

    if bool(host_specs) == bool(cluster_file):
        raise click.UsageError("give the hosts with --host (once per host) or --cluster FILE, one of the two")
    if model_config and not cluster_file:
        raise click.UsageError("--model-config plans for device kinds: give the hosts with --cluster")
    if model_config and (verify or model != DEFAULT_MODEL):
        raise click.UsageError("--model-config plans without weights: --model and --verify need a model's weights")
    allowed = [p.strip() for p in precisions.split(",")] if precisions else None
    if allowed and (set(allowed) - set(PRECISIONS) or "native" not in allowed):
        raise click.BadParameter(f"{precisions!r}: give native and any of {', '.join(PRECISIONS[1:])}",
                                 param_hint="--precisions")
    target = parse_fraction(max_ppl_increase)
    if cluster_file:
        inputs = cluster_plan_inputs(ctx, cluster_file, model, model_config, allowed, calibration_tokens,
                                     dict(prompt=prompt, output=output, batch=batch))
    else:
        inputs = host_plan_inputs(model, host_specs, device, link_gbps, calibration_tokens, allowed,
                                  dict(prompt=prompt, output=output, batch=batch))
    name, hosts, sens, workload, allowed, notes, prior = inputs
    if layer_group > 1:
        notes = notes + [f"search: layers planned in groups of {layer_group} (--layer-group)"]
    if max_orders is not None:
        notes = notes + [f"search: at most {max_orders} host orders searched exactly, else the hosts of most "
                         "memory, each way round (--max-orders)"]
    workload = Workload(workload["prompt"], workload["output"], workload["batch"])
    try:
        result = make_grouped_plan(name, hosts, sens, workload, target, allowed, layer_group, max_orders)
    except (PlanningError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    result = replace(result, notes=notes + result.notes)
    click.echo(f"plan for {name} ({result.dtype}; {workload.batch} requests of {workload.prompt_tokens} prompt + "
               f"{workload.output_tokens} output tokens): {len(result.stages)} stages, prefill micro-batch "
               f"{result.prefill_microbatch}, decode micro-batch {result.decode_microbatch}, solved in "
               f"{result.solve_seconds:.2f} s")
    for s in result.stages:
        mix = ", ".join(f"{s.precisions.count(p)} {p}" for p in dict.fromkeys(s.precisions))
        click.echo(f"  {s.host}: layers {s.start}-{s.end - 1} ({mix}); prefill {s.prefill_ms:.1f} ms, decode "
                   f"{s.decode_ms:.1f} ms per micro-batch; {s.memory_bytes / 2**20:.0f} of {s.capacity_bytes / 2**20:.0f} MiB")
    if prior:
        click.echo(f"perplexity: predicted +{result.predicted_ppl - 1:.2%} (target +{target:.1%}), from a prior, "
                   "not measured")
    else:
        click.echo(f"perplexity: base {result.base_ppl:.3f}, predicted {result.predicted_ppl:.3f} "
                   f"(target +{target:.1%}: at most {result.base_ppl * (1 + target):.3f})")
    click.echo(f"predicted throughput: {result.predicted_tokens_per_s:.1f} tokens/s")
    for baseline, speed in result.baselines.items():
        ratio = f"{result.predicted_tokens_per_s / speed:.2f}x" if speed else "does not fit"
        click.echo(f"  baseline {baseline}: {speed:.1f} tokens/s -> plan speed-up {ratio}")
    for note in result.notes:
        click.echo(f"note: {note}")
    if verify:
        files = resolve_model_or_exit(model)
        chosen = [p for s in result.stages for p in s.precisions]
        measured = measure_ppl(files.path, chosen, calibration_tokens)
        within = measured <= result.base_ppl * (1 + target)
        click.echo(f"verify: measured perplexity {measured:.3f} vs predicted {result.predicted_ppl:.3f} "
                   f"({'within' if within else 'OUTSIDE'} the target)")
    if out:
        result.save(Path(out))
        click.echo(f"wrote {out}")
    if show:
        from ..plan.draw import draw_plan

        try:
            draw_plan(result, Path(show))
        except ImportError:
            click.echo("error: --show needs matplotlib: pip install matplotlib", err=True)
            sys.exit(1)
        click.echo(f"drew {show}")


def resolve_model_or_exit(model: str):
    from ..model.resolve import ModelError, resolve_model

    try:
        return resolve_model(model)
    except ModelError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # converting a built-in model into a $HETSERVE_HOME it cannot write
        click.echo(f"error: cannot prepare the model {model}: {exc.strerror or exc} ({exc.filename})", err=True)
        sys.exit(1)


def host_plan_inputs(model, host_specs, device, link_gbps, calibration_tokens, allowed, workload):
    """--host: profiles measured (this device's) or given; sensitivity measured on the model's weights."""
    from pathlib import Path

    from ..model.precision import GPU_ONLY
    from ..plan.planner import HostInput
    from ..plan.profile import DeviceProfile, cached_profile
    from ..plan.quality import model_key, sensitivity

    files = resolve_model_or_exit(model)
    hosts, local = [], None
    for spec in host_specs:
        name, memory, profile_path = parse_host(spec)
        if profile_path:
            try:
                prof = DeviceProfile.load(Path(profile_path))
            except OSError as exc:
                raise click.BadParameter(f"cannot read the profile {profile_path}: {exc.strerror}",
                                         param_hint="--host") from None
            except (ValueError, KeyError, TypeError) as exc:
                raise click.BadParameter(f"{profile_path} is not a profile (hetserve profile --out): {exc}",
                                         param_hint="--host") from None
            if prof.model != model_key(files.path):  # another model's layer bytes and times
                raise click.BadParameter(f"{profile_path} was measured for another model (config {prof.model}, "
                                         f"{model} has {model_key(files.path)}): measure one with hetserve "
                                         f"profile --model {model}", param_hint="--host")
        else:
            local = local or cached_profile(files.path, device)[0]
            prof = local
        hosts.append(HostInput(name, memory, prof, link_gbps))
    if len({h.profile.dtype for h in hosts}) > 1:  # a cluster computes in one dtype
        raise click.BadParameter("the hosts' profiles are of different dtypes: "
                                 + ", ".join(f"{h.name} {h.profile.dtype}" for h in hosts), param_hint="--host")
    # Sensitivity is measured on this CPU, where quanto's fp8 cannot run: GPU-only precisions are left out.
    quantized = sorted({p for h in hosts for p in h.profile.layer_bytes
                        if p != "native" and p not in GPU_ONLY and p in (allowed or [p])})
    sens = sensitivity(files.path, quantized, calibration_tokens, "cpu")
    return model, hosts, sens, workload, allowed, [], False


def cluster_plan_inputs(ctx, cluster_file, model, model_config, allowed, calibration_tokens, given):
    """--cluster: profiles predicted for the device kinds; quality a prior (--model-config) or
    measured on the model's weights. The workload: the command line, else the file, else defaults."""
    from ..model.precision import GPU_ONLY
    from ..plan.cluster import ClusterError, load_cluster
    from ..plan.model_shape import ModelConfigError, config_shape, load_model_config
    from ..plan.offline import load_references, offline_hosts, speed_note
    from ..plan.prior import PRIOR_NOTE, depth_prior, source_sensitivity
    from ..plan.quality import sensitivity

    try:
        cluster = load_cluster(cluster_file)
        if model_config:
            name, config = load_model_config(model_config)
        else:
            files = resolve_model_or_exit(model)
            name, config = model, load_model_config(str(files.path))[1]
        shape = config_shape(name, config)
    except (ClusterError, ModelConfigError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    workload = {k: cluster.workload[k] if k in cluster.workload
                and ctx.get_parameter_source(k) is click.core.ParameterSource.DEFAULT else v for k, v in given.items()}
    hosts = offline_hosts(cluster, shape, load_references())
    run = sorted({p for h in hosts for p in h.profile.layer_bytes}, key=["native", "int8", "fp8", "int4"].index)
    allowed = [p for p in run if p in (allowed or run)]
    notes = [speed_note(cluster)]
    if model_config:
        sens = depth_prior(source_sensitivity(), shape.num_layers, allowed)
        notes = [f"model: {name} from its config alone, no weights"] + notes + [PRIOR_NOTE]
    else:
        # quanto's fp8 runs only on CUDA and sensitivity is measured on this CPU: fp8 is left out.
        allowed = [p for p in allowed if p not in GPU_ONLY]
        sens = sensitivity(files.path, [p for p in allowed if p != "native"], calibration_tokens, "cpu")
    return name, hosts, sens, workload, allowed, notes, bool(model_config)
