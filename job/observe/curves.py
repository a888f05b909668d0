"""The training-curves picture published next to the model: loss, learning rate and EM/F1 against step.

Drawn from the trainer state's ``log_history``, which checkpoints carry, so a resumed run draws
the whole run. matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""
from __future__ import annotations

from pathlib import Path

FILENAME = "training_curves.png"
_F1, _EM = "tab:blue", "tab:orange"


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], float(e[key])) for e in log_history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(log_history: list[dict], path: Path, title: str, final: dict | None = None,
                eval_examples: int | None = None) -> Path:
    """Write the PNG; ``final`` holds the final evaluation's exact_match/f1/total, drawn as stars."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    evals = series(log_history, "eval_f1")[0] or bool(final)
    fig = Figure(figsize=(15 if evals else 10, 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3 if evals else 2)
    fig.suptitle(title, fontsize=13)

    loss, lr = axes[0], axes[1]
    _line(loss, *series(log_history, "loss"), color="tab:red")
    loss.set(title="Training loss", xlabel="step", ylabel="loss (cross-entropy)")
    _line(lr, *series(log_history, "learning_rate"), color="tab:green")
    lr.set(title="Learning rate", xlabel="step", ylabel="learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    if evals:
        ev = axes[2]
        _line(ev, *series(log_history, "eval_f1"), color=_F1, label="F1")
        _line(ev, *series(log_history, "eval_exact_match"), color=_EM, label="exact match")
        if final:
            step = max([e.get("step", 0) for e in log_history] or [0])
            n = f" ({final.get('total')} questions)" if final.get("total") else ""
            ev.plot([step], [final["f1"]], marker="*", markersize=15, color=_F1, linestyle="", label=f"final F1{n}")
            ev.plot([step], [final["exact_match"]], marker="*", markersize=15, color=_EM, linestyle="",
                    label=f"final exact match{n}")
            for value, color in ((final["f1"], _F1), (final["exact_match"], _EM)):
                ev.annotate(f"{value:.1f}", (step, value), textcoords="offset points", xytext=(8, -4), color=color)
        sub = f" on the first {eval_examples} questions" if eval_examples else ""
        scores = series(log_history, "eval_f1")[1] + series(log_history, "eval_exact_match")[1]
        scores += [final["f1"], final["exact_match"]] if final else []
        # zero-based, scaled to the scores (a 0-100 axis flattens a 5 -> 10 F1 climb), room for the legend
        ev.set(title=f"Evaluation{sub}", xlabel="step", ylabel="score (%, SQuAD rules)",
               ylim=(0, max(max(scores) * 1.6, 5)))
        ev.legend(loc="upper left", fontsize=9, ncol=2)
    last = max([e.get("step", 0) for e in log_history] or [1])
    for ax in axes:  # one step axis for every panel, from the start of training
        ax.set_xlim(-0.02 * last, last * 1.12 + 0.5)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _line(ax, steps: list[int], values: list[float], color: str, label: str | None = None) -> None:
    if not steps:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    # markers when there are few points, so a short run still shows where its values are
    ax.plot(steps, values, color=color, marker="o" if len(steps) <= 30 else None, markersize=4, label=label)
