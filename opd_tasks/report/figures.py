"""The report's PNG plots (matplotlib, Agg): accuracy with a band over seeds, regimes, the classifier, stage costs."""

from __future__ import annotations

import statistics
from pathlib import Path

from opd_tasks.stages import STAGES

METHOD_COLORS = {"opd": "#1f77b4", "opd_suppress": "#ff7f0e", "topd": "#2ca02c"}


#: Colours for the other arms (an experiment's labels), in order: distinct from each other and from the above.
EXTRA_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000")


def _colors(methods: list[str]) -> dict[str, str]:
    """One colour per method or arm: the known methods keep theirs, the others take the next free one."""
    free = iter(EXTRA_COLORS * (1 + len(methods) // len(EXTRA_COLORS)))
    return {m: METHOD_COLORS.get(m) or next(free) for m in methods}


REGIME_COLORS = {"surface": "#8ecae6", "divergent": "#e76f51", "unprobed": "#e9c46a"}


#: The per-iteration plots: (metric of the accuracy query, scale, y label, title, file, caption, legend place).
CURVES = (
    ("accuracy", 100, "accuracy per sample (%)", "Test accuracy (per sample): mean over seeds, band = min-max",
     "accuracy.png", "Test accuracy (per sample) per iteration per method (mean line, min-max band over seeds, thin "
     "lines = single seeds).", "lower right"),
    ("rkl_per_token", 1, "reverse KL to the teacher (nats per token)",
     "Reverse KL of the test answers to the teacher: mean over seeds, band = min-max", "reverse_kl.png",
     "Reverse KL of the student's test answers to the teacher (teacher-forced, nats per answer token) per "
     "iteration per method (mean line, min-max band over seeds, thin lines = single seeds).", "upper right"),
)


def _curves(ax, rows: list[dict], metric: str, scale: float, methods: list[str], colors: dict, summary: dict) -> None:
    """`metric` per step of each method's runs: the mean over seeds, a min-max band, each seed a thin line."""
    from matplotlib.ticker import MaxNLocator

    for m in methods:
        mine = [a for a in rows if a["method"] == m]
        if not mine:
            continue
        steps = sorted({a["step"] for a in mine})
        by_step = {s: [a[metric] for a in mine if a["step"] == s] for s in steps}
        c = colors[m]
        for run in sorted({a["run"] for a in mine}):
            pts = sorted((a["step"], a[metric]) for a in mine if a["run"] == run)
            ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], color=c, alpha=0.25, lw=0.8)
        ax.fill_between(steps, [scale * min(by_step[s]) for s in steps], [scale * max(by_step[s]) for s in steps],
                        color=c, alpha=0.15, lw=0)
        ax.plot(steps, [scale * statistics.mean(by_step[s]) for s in steps], color=c, lw=2, marker="o", ms=3,
                label=f"{m} (n={summary['methods'][m]['runs']})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration (0 = baseline student)")
    ax.grid(alpha=0.3)


def plots(data: dict, summary: dict, out: Path) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: list[dict] = []
    methods = list(summary["methods"])
    colors = _colors(methods)

    # per iteration, for accuracy (where references exist) and the reverse KL to the teacher (where measured)
    for metric, scale, ylabel, title, name, caption, legend in CURVES:
        rows = [a for a in data["accuracy"] if a.get(metric) is not None]
        if rows:
            fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
            _curves(ax, rows, metric, scale, methods, colors, summary)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.legend(loc=legend)
            figs.append(_save(fig, out, name, caption))

    reg_methods = [m for m in methods if any(r["method"] == m for r in data["regimes"])]
    if reg_methods:
        fig, axes = plt.subplots(1, len(reg_methods), figsize=(3.6 * len(reg_methods) + 0.6, 3.6), dpi=110,
                                 squeeze=False, sharey=True)
        for ax, m in zip(axes[0], reg_methods, strict=True):
            rows = [r for r in data["regimes"] if r["method"] == m]
            its = sorted({r["iteration"] for r in rows})
            bottom = [0.0] * len(its)
            for regime in ("surface", "divergent", "unprobed"):
                vals = [100 * next((r["share"] for r in rows if r["iteration"] == i and r["regime"] == regime), 0.0)
                        for i in its]
                ax.bar(its, vals, bottom=bottom, color=REGIME_COLORS[regime], label=regime)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            ax.set_title(m)
            ax.set_xlabel("iteration")
            ax.set_xticks(its)
        axes[0][0].set_ylabel("share of high-loss tokens (%)")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        fig.suptitle("High-loss tokens by regime (pooled over seeds)")
        fig.tight_layout()
        figs.append(_save(fig, out, "regimes.png", "Share of high-loss tokens in each regime per iteration."))

    cls = [c for c in data["classifier"] if c["method"] in reg_methods]
    if cls:
        fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
        for m in reg_methods:
            rows = sorted((c for c in cls if c["method"] == m), key=lambda c: c["iteration"])
            its = [c["iteration"] for c in rows]
            col = colors[m]
            for key, style in (("surface_precision", "-"), ("surface_recall", "--")):
                ax.plot(its, [c[key] if c[key] is not None else float("nan") for c in rows], style, color=col,
                        marker="o", ms=3, label=f"{m}: {key.replace('_', ' ')}")
        ax.axhline(0.8, color="grey", lw=0.8, ls=":")
        ax.axhline(0.6, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1.02)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration (the analysis of rollouts from the student before update i)")
        ax.set_title("Surface classifier vs ground-truth form tokens (targets: P 0.8, R 0.6)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower left")
        figs.append(_save(fig, out, "classifier.png", "Precision and recall of the `surface` regime against the "
                                                       "testbed's `form` tokens."))

    if data["costs"]:
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(methods)), dpi=110)
        stages = [s for s in STAGES if any(c["stage"] == s for c in data["costs"])]
        stages += sorted({c["stage"] for c in data["costs"]} - set(stages))
        cmap = plt.get_cmap("tab10")
        left = [0.0] * len(methods)
        for j, s in enumerate(stages):
            vals = [next((c["seconds"] for c in data["costs"] if c["method"] == m and c["stage"] == s), 0.0)
                    for m in methods]
            ax.barh(methods, vals, left=left, color=cmap(j % 10), label=s)
            left = [a + v for a, v in zip(left, vals, strict=True)]
        ax.set_xlabel("seconds per iteration (median of computed stage runs)")
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title("Stage costs")
        figs.append(_save(fig, out, "costs.png", "Median wall seconds per computed stage run, per method."))
    return figs


def _save(fig, out: Path, name: str, caption: str) -> dict:
    import matplotlib.pyplot as plt

    path = out / name
    fig.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return {"file": name, "caption": caption}
