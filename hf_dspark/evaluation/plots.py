"""PNG plots of ``hf-dspark eval`` results (tau, speed-up and per-position acceptance)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from hf_dspark.errors import HfDSparkError
from hf_dspark.evaluation.summary import DSPARK


# ----------------------------------------------------------------------------- plots
def write_plots(results: dict[str, Any], folder: str | os.PathLike) -> list[Path]:
    """PNG plots of a results dict: per-position acceptance, tau per set, speed-up per set (with a baseline)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise HfDSparkError("--plots needs matplotlib: pip install 'hf-dspark[plots]'") from error
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sets = results.get("datasets", {})
    names = [DSPARK] + sorted({n for s in sets.values() for n in s.get("compare", {})})
    drafter_of = lambda s, n: s if n == DSPARK else s.get("compare", {}).get(n)  # noqa: E731
    written = []

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    for i, (key, entry) in enumerate(sets.items()):
        for n, style in zip(names, ("-o", "--s", ":^", "-.v")):
            summary = drafter_of(entry, n)
            if summary and summary.get("per_position_acceptance"):
                values = [v if v is not None else float("nan") for v in summary["per_position_acceptance"]]
                ax.plot(range(1, len(values) + 1), values, style, color=colors[i % 10], label=f"{key} / {n}")
    width = max((len((drafter_of(e, n) or {}).get("per_position_acceptance") or []) for e in sets.values()
                 for n in names), default=1)
    ax.set_xticks(range(1, width + 1))
    ax.set(xlabel="draft position", ylabel="acceptance (accepted / attempted)", ylim=(0, 1.05),
           xlim=(0.5, width + 0.5), title="Per-position acceptance")
    ax.legend(fontsize="small")
    written.append(folder / "acceptance_per_position.png")
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")

    def bars(metric: str, series: list[tuple[str, Callable[[dict], float | None]]], title: str, file: str):
        fig = Figure(figsize=(max(5.0, 1.3 * len(sets) * len(series)), 4))
        ax = fig.add_subplot()
        width = 0.8 / len(series)
        for j, (label, get) in enumerate(series):
            values = [get(entry) or 0.0 for entry in sets.values()]
            ax.bar([i + j * width for i in range(len(sets))], values, width, label=label)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(sets))], list(sets))
        ax.set(ylabel=metric, title=title)
        ax.legend(fontsize="small")
        written.append(folder / file)
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")

    def field_of(n, key):
        return lambda entry: (drafter_of(entry, n) or {}).get(key)

    bars("mean accepted length (tau)", [(n, field_of(n, "mean_accepted_length")) for n in names],
         "Mean accepted length per prompt set", "tau_per_dataset.png")
    if any("speedup" in entry for entry in sets.values()):
        series = [(n, field_of(n, "speedup")) for n in names]
        if any("prompt_lookup_speedup" in entry for entry in sets.values()):
            series.append(("prompt lookup", lambda entry: entry.get("prompt_lookup_speedup")))
        bars("speed-up over plain generate (1 = as fast)", series, "Speed-up per prompt set", "speedup_per_dataset.png")
    return written
