"""The run's report: what was trained, how the loss went, and the answers side by side."""

from pathlib import Path

from .data import write_atomic


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdict(summary: dict) -> str:
    first, last = summary["first_loss"], summary["last_loss"]
    trend = "fell" if last < first else "did not fall"
    return (f"Training loss {trend} from {first:.3f} to {last:.3f} over {summary['steps']} steps "
            f"({summary['tokens']} trained tokens in {summary['time_s']:.0f} s).")


def write_report(summary: dict, results: dict) -> tuple[Path, str]:
    """`report.md` in the run folder; returns its path and its markdown."""
    run_dir = Path(summary["run_dir"])
    lines = [
        f"# LoRA run `{run_dir.name}`", "",
        verdict(summary), "",
        "| | |", "|---|---|",
        f"| engine | {summary['backend']} |",
        f"| base model | {summary['base_model']} |",
        f"| final adapter | `{summary['final_lora_weights']}` |",
        f"| checkpoints | {', '.join(e['name'] for e in summary['checkpoints']) or 'none'} |",
        f"| answers | `{run_dir / 'results.json'}` |", "",
        "## Answers", "",
    ]
    has_base = any("base_response" in r for r in results["results"])
    lines += ["| prompt | LoRA | base |", "|---|---|---|"] if has_base else ["| prompt | LoRA |", "|---|---|"]
    for r in results["results"]:
        row = [_cell(r["prompt"][-1]["content"]), _cell(r["lora_response"])]
        if has_base:
            row.append(_cell(r.get("base_response", "")))
        lines.append("| " + " | ".join(row) + " |")
    markdown = "\n".join(lines) + "\n"
    path = run_dir / "report.md"
    write_atomic(path, markdown)
    return path, markdown
