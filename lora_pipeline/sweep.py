"""A sweep: the pipeline once per combination of learning rates and ranks, and the comparison
of the runs it made, as sweep_report.html (a table and the held-out curves overlaid)."""

import base64
import html
import itertools
from pathlib import Path

from .data import write_atomic, write_json
from .run_folder import RunFolder, RunSummary
from .settings import SWEPT, SweepSettings

COLUMNS = ["configuration", "steps", "held-out loss, final", "held-out loss, best", "best at step",
           "trained tokens/s", "run folder"]


def configurations(sweep: SweepSettings, params: dict) -> list[dict]:
    """The pipeline's parameters for each combination, in a stable order."""
    lists = [getattr(sweep, name) for name in SWEPT]
    return [{**params, **dict(zip(SWEPT.values(), values))} for values in itertools.product(*lists)]


def label(config: dict) -> str:
    return f"learning rate {config['learning_rate']:g}, rank {config['rank']}"


def comparison(runs: list[tuple[str, RunSummary]]) -> list[dict]:
    """One row per run, and which one is best: the lowest held-out loss of any of its saved
    adapters (its final loss where none was measured)."""
    rows = []
    for name, s in runs:
        log = RunFolder(s.run_dir).read_log()
        step_time = sum(r["time_s"] for r in log)
        best = s.best or {}
        rows.append({"configuration": name, "steps": s.steps, "final": s.val_loss_final,
                     "best": best.get("val_loss"), "best_step": best.get("step"),
                     "tokens_per_s": s.tokens / step_time if step_time else None, "run_dir": s.run_dir})
    score = [(r["best"] if r["best"] is not None else r["final"], i) for i, r in enumerate(rows)]
    scored = [x for x in score if x[0] is not None]
    best_i = min(scored)[1] if scored else None
    for i, r in enumerate(rows):
        r["is_best"] = i == best_i
    return rows


def _f(value, digits=4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cells(r: dict) -> list[str]:
    return [r["configuration"] + (" (best)" if r["is_best"] else ""), str(r["steps"]), _f(r["final"]),
            _f(r["best"]), "-" if r["best_step"] is None else str(r["best_step"]), _f(r["tokens_per_s"], 1),
            r["run_dir"]]


def held_out_figure(runs: list[tuple[str, RunSummary]]):
    """Each run's held-out loss per step, overlaid (step 0: the base model)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 3.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    for name, s in runs:
        val_log = RunFolder(s.run_dir).read_val_log()
        if val_log:
            ax.plot([r["step"] for r in val_log], [r["val_loss"] for r in val_log], "o-", linewidth=1.4, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    return fig


def write_sweep_report(folder: str | Path, runs: list[tuple[str, RunSummary]]) -> dict:
    """sweep_report.html (self-contained), sweep.json and held_out.png in `folder`; returns
    the rows, the best row and the paths."""
    import io

    folder = Path(folder)
    rows = comparison(runs)
    buf = io.BytesIO()
    held_out_figure(runs).savefig(buf, format="png")
    png = buf.getvalue()
    write_atomic(folder / "held_out.png", png)
    best = next((r for r in rows if r["is_best"]), None)
    said = (f"Best: {best['configuration']}, held-out loss {_f(best['best'] if best['best'] is not None else best['final'])}."
            if best else "No held-out loss was measured: keep --val-fraction above 0 to compare the runs.")
    table = "".join("<tr" + (' class="best"' if r["is_best"] else "") + ">"
                    + "".join(f"<td>{html.escape(c)}</td>" for c in cells(r)) + "</tr>" for r in rows)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>LoRA sweep</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
            "th{background:#f3f3f3}.best{background:#fff5d6}img{max-width:100%}</style></head><body>"
            f"<h1>LoRA sweep: {len(rows)} runs</h1><p>{html.escape(said)}</p><table><tr>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + f"</tr>{table}</table>"
            "<h2>Held-out loss</h2>"
            f'<img alt="held-out loss per step, each run" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            "</body></html>\n")
    write_atomic(folder / "sweep_report.html", page)
    write_json(folder / "sweep.json", {"runs": rows, "best": best})
    return {"rows": rows, "best": best, "verdict": said, "html_path": str(folder / "sweep_report.html")}
