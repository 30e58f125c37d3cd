"""Draw a plan (`hetserve plan --show plan.png`): one bar per stage, its layers coloured by
precision, with the stage's predicted prefill and decode times and its memory against capacity."""

from __future__ import annotations

from pathlib import Path

from .planner import Plan

COLOURS = {"native": "#4c72b0", "int8": "#55a868", "fp8": "#8172b2", "int4": "#c44e52", "w8a8": "#dd8452"}


def draw_plan(plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = plan.stages[-1].end
    fig, (ax, mem) = plt.subplots(2, 1, figsize=(max(8, layers * 0.25), 2 + 0.9 * len(plan.stages)),
                                  gridspec_kw={"height_ratios": [len(plan.stages), len(plan.stages)]})
    for row, stage in enumerate(plan.stages):
        for i, precision in enumerate(stage.precisions):
            ax.barh(row, 1, left=stage.start + i, color=COLOURS.get(precision, "grey"), edgecolor="white")
        ax.text(stage.end + 0.3, row, f"prefill {stage.prefill_ms:.1f} ms, decode {stage.decode_ms:.1f} ms",
                va="center", fontsize=8)
        mem.barh(row, stage.capacity_bytes / 2**20, color="#dddddd")
        mem.barh(row, stage.memory_bytes / 2**20, color="#4c72b0")
    for axis in (ax, mem):
        axis.set_yticks(range(len(plan.stages)), [s.host for s in plan.stages])
        axis.invert_yaxis()
    ax.set_xlim(0, layers * 1.6)
    ax.set_xlabel("decoder layer")
    ax.legend(handles=[Patch(color=c, label=p) for p, c in COLOURS.items()
                       if any(p in s.precisions for s in plan.stages)], loc="upper right", fontsize=8)
    ax.set_title(f"{plan.model}: {plan.predicted_tokens_per_s:.1f} tokens/s predicted, perplexity "
                 f"{plan.predicted_ppl:.2f} (base {plan.base_ppl:.2f}, target +{plan.max_ppl_increase:.1%})", fontsize=9)
    mem.set_xlabel("memory MiB (used / capacity)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
