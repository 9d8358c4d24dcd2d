"""Plots saved as PNG (and logged to MLflow by the caller). Matplotlib without a display."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CURVES = (
    ("task_loss", "task loss g(w)"),
    ("harmful_loss", "harmful loss h(w)"),
    ("harmful_loss_perturbed", "harmful loss h(w + eps)"),
    ("harmful_loss_after_step", "harmful loss after a simulated step (Booster)"),
    ("perturbed_loss", "loss with perturbed hidden states (Vaccine)"),
    ("alignment_loss", "alignment loss (Lisa's alignment steps)"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: Sequence[dict[str, float]], title: str, path: str | Path) -> Path:
    """Per-step losses of one run: the task loss, and each defence's own (Panacea's h at w and at w + eps...);
    a loss logged only on some steps (Lisa alternates) is drawn at those steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in CURVES:
        points = [(step, row[key]) for step, row in enumerate(history, start=1) if key in row]
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < len(history) else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_method_comparison(rows: Sequence[tuple[str, dict[str, float]]], path: str | Path) -> Path:
    """Held-out harmful loss at w_T and as released, and held-out task loss, for each method."""
    plt = _pyplot()
    methods = [name for name, _ in rows]
    series = (
        ("heldout_harmful_loss", "harmful loss at w_T"),
        ("released_heldout_harmful_loss", "harmful loss as released"),
        ("released_heldout_task_loss", "task loss as released"),
    )
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(methods)), 4))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        values = [summary.get(key, float("nan")) for _, summary in rows]
        ax.bar([m + i * width for m in range(len(methods))], values, width, label=label)
    ax.set_xticks([m + width for m in range(len(methods))], methods, rotation=15)
    ax.set_ylabel("mean loss on held-out answers")
    ax.set_title("higher harmful loss = worse at producing harmful answers")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_layerwise_perturbation(rows, title: str, path: str | Path) -> Path:
    """eps per transformer block, one line per module type: against the LoRA weights and against W_base."""
    plt = _pyplot()
    kinds = sorted({row.kind for row in rows})
    in_blocks = [row for row in rows if row.layer is not None]
    has_base = any(row.relative_to_base is not None for row in in_blocks)
    panels = [("relative_to_lora", "||eps|| / ||w_lora||")]
    if has_base:
        panels.append(("relative_to_base", "||dW|| / ||W_base||  (merged weight)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for kind in kinds:
            points = sorted((row.layer, getattr(row, key)) for row in in_blocks if row.kind == kind)
            points = [(layer, value) for layer, value in points if value is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=kind)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _interval(cell) -> tuple[float, list[list[float]]]:
    """(centre, [[below], [above]]) of a comparison Cell: its 95% pooled interval as an asymmetric error bar."""
    return cell.mean, [[max(0.0, cell.mean - cell.pooled.ci_low)], [max(0.0, cell.pooled.ci_high - cell.mean)]]


def plot_hs_vs_fa(
    points,
    path: str | Path,
    title: str = "harmful score against fine-tune accuracy",
    trials=(),
    axes: tuple[str, str] = ("", ""),
) -> Path:
    """One point per method: (name, HS Cell, FA Cell); error bars are the cells' 95% intervals.

    `trials`: (label, HS, FA) of search trials on the same aligned model, drawn small and grey
    behind the methods, so the chosen setting is seen among the ones the search tried.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, (label, hs, fa) in enumerate(trials):
        ax.scatter([fa], [hs], marker="x", color="0.55", s=22, zorder=1, label="search trials" if index == 0 else None)
        ax.annotate(label, (fa, hs), fontsize=6, color="0.4", xytext=(3, 3), textcoords="offset points")
    for name, hs, fa in points:
        (y, yerr), (x, xerr) = _interval(hs), _interval(fa)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=name, zorder=2)
    ax.set_xlabel(f"fine-tune accuracy FA (%){' on the ' + axes[1] if axes[1] else ''}  — higher is better")
    ax.set_ylabel(f"harmful score HS (%){' on the ' + axes[0] if axes[0] else ''}  — lower is better")
    ax.set_title(
        f"{title}\n(error bars: 95% intervals: Wilson for one seed, over seeds a bootstrap over prompts)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_suite_headlines(comparison, headlines: dict[str, str], path: str | Path) -> Path:
    """One panel per suite: each method's headline rate (HS, accuracy, refusals, answered) with its 95% interval."""
    plt = _pyplot()
    suites = [s for s in headlines if any(comparison.cell(k, s, headlines[s]) for k in comparison.methods)]
    columns = min(4, max(1, len(suites)))
    rows = -(-len(suites) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    methods = list(comparison.methods.items())
    for ax, suite in zip(axes.flat, suites):
        for position, (key, method) in enumerate(methods):
            cell = comparison.cell(key, suite, headlines[suite])
            if cell is not None:
                centre, error = _interval(cell)
                ax.bar(position, centre, yerr=error, capsize=3, color=f"C{position}", label=method)
        ax.set_title(f"{suite}: {headlines[suite].replace('_', ' ')}", fontsize=9)
        ax.set_xticks([])
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(suites) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.suptitle(
        "every suite's headline (%), 95% intervals (Wilson for one seed, over seeds a bootstrap over prompts)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
