"""The run's report: what was trained, how the loss went, and the answers side by side; and
the note a failed run leaves behind."""

import dataclasses
import json
from pathlib import Path

from .data import write_atomic
from .train import TrainConfig, read_registry


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdict(summary: dict) -> str:
    """One sentence (two with held-out data): did training work, did the LoRA beat its base."""
    first, last = summary["first_loss"], summary["last_loss"]
    trend = "fell" if last < first else "did not fall"
    text = (f"Training loss {trend} from {first:.3f} to {last:.3f} over {summary['steps']} steps "
            f"({summary['tokens']} trained tokens in {summary['time_s']:.0f} s).")
    base, final = summary.get("val_loss_base"), summary.get("val_loss_final")
    if base is not None and final is not None:
        change = (final - base) / base * 100
        text += (f" On held-out data the LoRA {'beat' if final < base else 'did not beat'} the base model: "
                 f"{final:.3f} vs {base:.3f} nats/token ({change:+.0f}%)")
        best = summary.get("best")
        text += f"; best at step {best['step']} ({best['val_loss']:.3f})." if best else "."
    return text


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
    ]
    val_log = run_dir / "validation_log.json"
    if val_log.exists():
        lines += ["## Held-out loss", "", "| step | loss (nats/token) | perplexity |", "|---|---|---|"]
        lines += [f"| {r['step']}{' (base)' if r['step'] == 0 else ''} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |"
                  for r in json.loads(val_log.read_text())]
        lines.append("")
    lines += ["## Answers", ""]
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


def resume_command(config: dict) -> str:
    """The `lora-pipeline train` command that continues the run of this config.json."""
    args = [f"--data {config['data']}"]
    for f in dataclasses.fields(TrainConfig):
        value = config.get(f.name)
        if f.name in ("data", "start_over") or value is None or value == f.default:
            continue
        args.append(f"--{f.name.replace('_', '-')} {value}")
    args.append(f"--run-name {Path(config['run_dir']).name}")
    return "lora-pipeline train " + " ".join(dict.fromkeys(args))


def write_failure_summary(output_dir: str, run_name: str | None, error: str, since: float) -> tuple[Path, str]:
    """`failure.md` in the failed run's folder (or `last_failure.md` in the output folder when
    the run never got one): what failed, the last good checkpoint, how to continue."""
    out = Path(output_dir)
    if run_name:
        run_dir = out / run_name
    else:  # the newest run folder this flow run made
        made = [p for p in out.glob("lora_*") if (p / "config.json").exists() and p.stat().st_mtime >= since]
        run_dir = max(made, key=lambda p: p.stat().st_mtime) if made else None
    lines = ["# lora-pipeline run failed", "", f"**Error:** {error}", ""]
    if run_dir and (run_dir / "config.json").exists():
        config = json.loads((run_dir / "config.json").read_text())
        states = [e for e in read_registry(run_dir) if e.get("state_path")]
        last = f"`{states[-1]['state_path']}` (step {states[-1]['step']})" if states else "none yet"
        lines += [f"**Run folder:** `{run_dir}`", f"**Last good checkpoint:** {last}", "",
                  "Continue where it stopped (same data and settings, same run name):", "",
                  f"    {resume_command(config)}", "",
                  f"or rerun the flow with the parameter run_name={run_dir.name}."]
        path = run_dir / "failure.md"
    else:
        lines += ["It failed before a run folder was made; fix the error and run the same command again."]
        path = out / "last_failure.md"
    markdown = "\n".join(lines) + "\n"
    write_atomic(path, markdown)
    return path, markdown
