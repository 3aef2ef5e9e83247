"""The run's report: what was trained, how the losses went, signs of overfitting, and the
answers side by side, as report.md and as a self-contained report.html with loss.png embedded;
and the note a failed run leaves behind."""

import base64
import html
import io
import re
import shlex
from pathlib import Path

from .data import read_chat_jsonl, read_json, write_atomic
from .run_folder import PROMOTION, STATE, RunFolder, RunSummary
from .settings import TrainSettings, fields_of, flag_name

SPAN = 50  # characters an answer must share with a training example to count as repeated verbatim


def md_text(text: str) -> str:
    """Model or user text, shown as written in markdown: every character markdown would read as
    markup (emphasis, code, links, headings, HTML, tables) escaped."""
    return re.sub(r"([\\`*_{}\[\]()<>#+\-.!|~])", r"\\\1", text)


def md_cell(text: str) -> str:
    """Text for a markdown table cell: escaped, on one line."""
    return md_text(text).replace("\r", "").replace("\n", " ")


def md_quote(text: str) -> str:
    """Text as a markdown block quote: escaped, its lines kept."""
    return "\n".join("> " + md_text(line) for line in text.splitlines() or [""])


def starting_point(summary: RunSummary) -> str:
    """What step 0's held-out loss measured: the base model, or with --init-from the adapter
    the run started from."""
    return "the adapter it started from" if summary.init_weights else "the base model"


def verdict(summary: RunSummary) -> str:
    """One sentence (two with held-out data): did training work, did the LoRA beat its base."""
    first, last = summary.first_loss, summary.last_loss
    trend = "fell" if last < first else "did not fall"
    text = (f"Training loss {trend} from {first:.3f} to {last:.3f} over {summary.steps} steps "
            f"({summary.tokens} trained tokens in {summary.time_s:.0f} s).")
    base, final = summary.val_loss_base, summary.val_loss_final
    if base is not None and final is not None:
        change = (final - base) / base * 100
        text += (f" On held-out data the LoRA {'beat' if final < base else 'did not beat'} {starting_point(summary)}: "
                 f"{final:.3f} vs {base:.3f} nats/token ({change:+.0f}%)")
        best = summary.best
        text += f"; best at step {best['step']} ({best['val_loss']:.3f})." if best else "."
    return text


def shares_span(text: str, corpus: str, span: int = SPAN) -> bool:
    """Whether `text` and `corpus` have a common substring of `span` characters.
    Any such substring holds a whole piece of `text` of span // 2 characters that starts at a
    multiple of span // 2, so only those pieces are looked up (str.find, at C speed); each
    place a piece occurs is then widened both ways to see how long the common run is."""
    k = span // 2
    for start in range(0, len(text) - k + 1, k):
        piece = text[start:start + k]
        at = corpus.find(piece)
        while at != -1:
            left = 0
            while left < start and left < at and text[start - left - 1] == corpus[at - left - 1]:
                left += 1
            right = k
            while start + right < len(text) and at + right < len(corpus) and \
                    text[start + right] == corpus[at + right]:
                right += 1
            if left + right >= span:
                return True
            at = corpus.find(piece, at + 1)
    return False


def verbatim_counts(results: list[dict], data: Path) -> dict:
    """How many LoRA (and base) answers repeat SPAN characters of a training example verbatim."""
    # \0 between examples: no match runs from one example into the next.
    corpus = "\n\0\n".join("\n".join(m["content"] for m in row["messages"]) for row in read_chat_jsonl(data))
    return {who: sum(shares_span(r[f"{who}_response"], corpus) for r in results)
            for who in ("lora", "base") if all(f"{who}_response" in r for r in results)}


def checkpoint_rows(summary: RunSummary, train_log: list[dict], val_log: list[dict]) -> list[dict]:
    """One row per saved adapter: its step, the loss of that step's batch, and where held-out
    data was given, the loss on held-out and on as many training examples with its weights and
    the gap between them (held-out minus training)."""
    step_loss = {r["step"]: r["loss"] for r in train_log}
    measured = {r["step"]: r for r in val_log}
    best = (summary.best or {}).get("name")
    rows = []
    for entry in summary.checkpoints:
        if entry.name == STATE:
            continue
        m = measured.get(entry.step, {})
        val, train = m.get("val_loss"), m.get("train_loss")
        rows.append({"name": entry.name, "step": entry.step, "step_loss": step_loss.get(entry.step),
                     "train_loss": train, "val_loss": val,
                     "gap": val - train if val is not None and train is not None else None,
                     "best": entry.name == best, "path": entry.path})
    return rows


def overfitting(val_log: list[dict], verbatim: dict, answers: int) -> list[str]:
    """Plain sentences on the signs of overfitting: held-out loss rising again, the gap between
    held-out and training loss widening, answers that repeat training data word for word."""
    lines = []
    measured = [r for r in val_log if r["step"] > 0]
    if measured:
        best = min(measured, key=lambda r: r["val_loss"])
        last = measured[-1]
        if last["val_loss"] > best["val_loss"] * 1.01:
            lines.append(f"Held-out loss was lowest at step {best['step']} ({best['val_loss']:.3f}) and rose to "
                         f"{last['val_loss']:.3f} by step {last['step']}: a sign of overfitting; "
                         "best_lora_weights.json names the better adapter.")
        else:
            lines.append(f"Held-out loss did not rise again (last {last['val_loss']:.3f} at step {last['step']}): "
                         "no sign of overfitting there.")
    else:
        lines.append("No held-out loss was measured: keep --val-fraction above 0 (run) or pass --val-data "
                     "(train) to see whether the LoRA generalises.")
    gaps = [r for r in measured if "train_loss" in r]
    if len(gaps) >= 2:
        before, after = (r["val_loss"] - r["train_loss"] for r in (gaps[0], gaps[-1]))
        lines.append(f"Held-out minus training loss (same weights, as many examples) went from {before:+.3f} "
                     f"at step {gaps[0]['step']} to {after:+.3f} at step {gaps[-1]['step']}"
                     + (": widening, the LoRA fits its training data better than new data."
                        if after > before + 0.05 else "."))
    if verbatim and answers:
        said = [f"{who} {n}/{answers} ({n / answers:.0%})" for who, n in
                (("LoRA", verbatim.get("lora")), ("base", verbatim.get("base"))) if n is not None]
        lines.append(f"Answers repeating {SPAN} characters of a training example verbatim: {', '.join(said)}.")
    return lines


def metrics(summary: RunSummary, results: dict) -> dict:
    """Everything the report shows, computed once from the run folder and the answers."""
    folder = RunFolder(summary.run_dir)
    train_log, val_log = folder.read_log(), folder.read_val_log()
    config = folder.read_config()
    data = Path(config.get("data", ""))
    verbatim = verbatim_counts(results["results"], data) if data.is_file() else {}
    step_time = sum(r["time_s"] for r in train_log)
    rows = checkpoint_rows(summary, train_log, val_log)
    return {
        "train_log": train_log, "val_log": val_log, "checkpoints": rows, "verbatim": verbatim,
        "placement": config.get("placement"),
        "step_time_s": step_time, "tokens_per_s": summary.tokens / step_time if step_time else None,
        "overfitting": overfitting(val_log, verbatim, len(results["results"])),
    }


def loss_figure(train_log: list[dict], val_log: list[dict], start: str):
    """Training loss at every step and held-out loss where it was measured (step 0: `start`,
    the weights training started from)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7.5, 3.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.plot([r["step"] for r in train_log], [r["loss"] for r in train_log], color="#1f77b4",
            linewidth=1.4, label="training loss (each step's batch)")
    if val_log:
        ax.plot([r["step"] for r in val_log], [r["val_loss"] for r in val_log], "o-", color="#d62728",
                linewidth=1.4, label=f"held-out loss (step 0: {start})")
        measured = [r for r in val_log if "train_loss" in r]
        ax.plot([r["step"] for r in measured], [r["train_loss"] for r in measured], "s--", color="#1f77b4",
                alpha=0.6, label="training examples, measured like held-out")
        best = min(val_log, key=lambda r: r["val_loss"])
        ax.plot([best["step"]], [best["val_loss"]], "*", color="#d62728", markersize=14, label="best")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


CHECKPOINT_COLUMNS = ["adapter", "step", "batch loss", "training loss", "held-out loss", "gap"]


def checkpoint_cells(r: dict) -> list:
    """A checkpoint row as CHECKPOINT_COLUMNS: the loss of the step's batch, then the losses
    measured with its weights on training and held-out examples, and their difference."""
    return [r["name"] + (" (best)" if r["best"] else ""), r["step"], _f(r["step_loss"]), _f(r["train_loss"]),
            _f(r["val_loss"]), _f(r["gap"])]


def _summary_rows(summary: RunSummary, m: dict) -> list[tuple[str, str]]:
    best = summary.best
    where = m["placement"]
    rows = [("engine", summary.backend + (f" on {where['device_name']}, {where['dtype']} base weights, "
                                          f"{where['lora_dtype']} LoRA" if where else "")),
            ("base model", summary.base_model),
            ("steps", str(summary.steps)), ("trained tokens", f"{summary.tokens:,}"),
            ("time", f"{summary.time_s:.0f} s ({m['step_time_s']:.0f} s in steps)"),
            ("tokens/s", _f(m["tokens_per_s"], 0))]
    if summary.val_loss_base is not None:
        start = starting_point(summary) + (f", {summary.init_weights}" if summary.init_weights else "")
        rows += [(f"held-out loss, {start}", _f(summary.val_loss_base, 4)),
                 ("held-out loss, LoRA (final)", _f(summary.val_loss_final, 4))]
        if best:
            rows.append(("held-out loss, best", f"{best['val_loss']:.4f} ({best['name']}, step {best['step']})"))
    rows += [("final adapter", summary.final_lora_weights)]
    return rows


def _answer_columns(results: dict) -> list[str]:
    return ["lora"] + (["base"] if all("base_response" in r for r in results["results"]) else [])


def _markdown(summary: RunSummary, results: dict, m: dict) -> str:
    run_dir = Path(summary.run_dir)
    lines = [f"# LoRA run `{run_dir.name}`", "", verdict(summary), "", "| | |", "|---|---|"]
    lines += [f"| {k} | {md_cell(v)} |" for k, v in _summary_rows(summary, m)]
    lines += ["", "Plots and everything below: `report.html` (loss curves: `loss.png`).", ""]
    lines += ["## Checkpoints", "", "| " + " | ".join(CHECKPOINT_COLUMNS) + " |", "|---" * len(CHECKPOINT_COLUMNS) + "|"]
    lines += ["| " + " | ".join(map(str, checkpoint_cells(r))) + " |" for r in m["checkpoints"]]
    if m["val_log"]:
        lines += ["", "## Held-out loss", "", "| step | loss (nats/token) | perplexity |", "|---|---|---|"]
        lines += [f"| {r['step']}{' (base)' if r['step'] == 0 else ''} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |"
                  for r in m["val_log"]]
    if m["overfitting"]:
        lines += ["", "## Overfitting", ""] + [f"- {line}" for line in m["overfitting"]]
    lines += ["", "## Answers", ""]
    # One section per prompt, not a table: answers run long and over several lines.
    for i, r in enumerate(results["results"], start=1):
        lines += [f"**Prompt {i}**", "", md_quote(r["prompt"][-1]["content"]), ""]
        for w in _answer_columns(results):
            lines += [f"**{'LoRA' if w == 'lora' else 'Base model'}** ({r.get(f'{w}_tokens', '?')} tokens, "
                      f"{md_cell(str(r.get(f'{w}_stop_reason', '?')))})", "", md_quote(r[f"{w}_response"]), ""]
    return "\n".join(lines).rstrip() + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;
text-align:left;vertical-align:top}th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.best{background:#fff5d6}.meta{color:#777;font-size:.85em}.answer{white-space:pre-wrap;max-width:28rem}
img{max-width:100%}"""


def _table(headers: list[str], rows: list[list[str]], row_class=lambda i: "", table_id: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" if any(headers) else ""
    body = "".join(f'<tr class="{row_class(i)}">' + "".join(row) + "</tr>" for i, row in enumerate(rows))
    id_attr = f' id="{table_id}"' if table_id else ""
    return f"<table{id_attr}>{head}{body}</table>"


def _td(value, cls: str = "") -> str:
    return f'<td class="{cls}">{html.escape(str(value))}</td>'


def _html(summary: RunSummary, results: dict, m: dict, png: bytes) -> str:
    name = Path(summary.run_dir).name
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>LoRA run {html.escape(name)}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>LoRA run <code>{html.escape(name)}</code></h1><p>{html.escape(verdict(summary))}</p>",
             "<h2>Summary</h2>", _table(["", ""], [[_td(k), _td(v)] for k, v in _summary_rows(summary, m)]),
             "<h2>Loss</h2>",
             f'<img alt="training and held-out loss per step" src="data:image/png;base64,{base64.b64encode(png).decode()}">',
             "<h2>Checkpoints</h2>",
             _table(CHECKPOINT_COLUMNS + ["path"],
                    [[_td(c, "num" if i else "") for i, c in enumerate(checkpoint_cells(r))] + [_td(r["path"])]
                     for r in m["checkpoints"]],
                    lambda i: "best" if m["checkpoints"][i]["best"] else "")]
    if m["overfitting"]:
        parts += ["<h2>Overfitting</h2><ul>"] + [f"<li>{html.escape(line)}</li>" for line in m["overfitting"]] + ["</ul>"]
    who = _answer_columns(results)
    parts += ["<h2>Answers</h2>",
              _table(["prompt"] + ["LoRA" if w == "lora" else "base" for w in who],
                     [[f'<td class="answer">{html.escape(r["prompt"][-1]["content"])}</td>']
                      + [f'<td class="answer">{html.escape(r[f"{w}_response"])}<div class="meta">'
                         f'{r.get(f"{w}_tokens", "?")} tokens, {html.escape(str(r.get(f"{w}_stop_reason", "?")))}'
                         "</div></td>" for w in who] for r in results["results"]])]
    s = results.get("settings", {})
    parts.append(f'<p class="meta">Sampled with max_tokens {s.get("max_tokens")}, temperature '
                 f'{s.get("temperature")}, seed {s.get("seed")}; the same for LoRA and base.</p>')
    parts += ["<details><summary>Training log (the points of the curves)</summary>",
              _table(["step", "loss", "tokens", "learning rate", "seconds"],
                     [[_td(r["step"], "num"), _td(f"{r['loss']:.6f}", "num"), _td(r["tokens"], "num"),
                       _td(f"{r['lr']:.3e}", "num"), _td(r["time_s"], "num")] for r in m["train_log"]],
                     table_id="training-log")]
    if m["val_log"]:
        parts += [_table(["step", "held-out loss", "perplexity"],
                         [[_td(r["step"], "num"), _td(f"{r['val_loss']:.6f}", "num"), _td(f"{r['val_ppl']:.3f}", "num")]
                          for r in m["val_log"]], table_id="validation-log")]
    parts += ["</details>"]
    promotion = read_json(Path(summary.run_dir) / PROMOTION, None)
    if promotion:
        parts += ["<h2>Promotion</h2>", f"<p>{html.escape(promotion['reason'])}</p>",
                  '<p><a href="../nightly.html">Every night, on the evaluation set</a></p>']
    parts += ["</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(summary: RunSummary, results: dict) -> dict:
    """report.md, report.html (self-contained: the plot is embedded) and loss.png in the run
    folder. Returns report.html's path, the markdown and the metrics behind them."""
    run_dir = Path(summary.run_dir)
    m = metrics(summary, results)
    png = _png(loss_figure(m["train_log"], m["val_log"], starting_point(summary)))
    write_atomic(run_dir / "loss.png", png)
    markdown = _markdown(summary, results, m)
    write_atomic(run_dir / "report.md", markdown)
    write_atomic(run_dir / "report.html", _html(summary, results, m, png))
    return {"html_path": str(run_dir / "report.html"), "markdown": markdown, "metrics": m}


def resume_command(config: dict) -> str:
    """The `lora-pipeline train` command that continues the run of this config.json, quoted
    for the shell (a run name or path may hold spaces or `;`)."""
    args = ["lora-pipeline", "train"]
    for f in fields_of(TrainSettings):
        value = config.get(f.name)
        if f.name in ("start_over", "run_name", "output_dir") or value is None or value == f.default:
            continue
        args += [flag_name(f)] if value is True else [flag_name(f), str(value)]
    run_dir = Path(config["run_dir"])
    args += ["--output-dir", str(run_dir.parent), "--run-name", run_dir.name]
    return shlex.join(args)


def write_failure_summary(output_dir: str, run_name: str | None, error: str, since: float,
                          how_to_continue: str | None = None, details: str = "") -> tuple[Path, str]:
    """`failure.md` in the failed run's folder (or `last_failure.md` in the output folder when
    the run never got one, when another process holds that folder, or when it holds a run that
    had finished before this flow run began `since`): what failed, the last
    good checkpoint, how to continue (`how_to_continue`, else the `lora-pipeline train` command
    that does), and `details` (the traceback). Paths in it are absolute."""
    out = Path(output_dir).resolve()
    if run_name:
        run_dir = out / run_name
    else:  # the newest run folder this flow run wrote in
        made = [p for p in out.glob("lora_*") if (p / "config.json").exists() and p.stat().st_mtime >= since]
        run_dir = max(made, key=lambda p: p.stat().st_mtime) if made else None
    lines = ["# lora-pipeline run failed", "", f"**Error:** {error}", ""]
    folder = RunFolder(run_dir) if run_dir and (run_dir / "config.json").exists() else None
    # A run that had finished before this flow run began (a refused rerun, say) did not fail: a
    # note in its folder would say it had. The note goes beside it.
    finished = folder is not None and (folder / "summary.json").exists() and \
        (folder / "summary.json").stat().st_mtime < since
    if folder and finished:
        lines += [f"The run in `{folder.path}` had finished before this attempt and is intact; this attempt "
                  "failed before changing it."]
    if folder and not finished and not folder.in_use_elsewhere():
        states = [e for e in folder.registry() if e.state_path]
        last = f"`{states[-1].state_path}` (step {states[-1].step})" if states else "none yet"
        lines += [f"**Run folder:** `{folder.path}`", f"**Last good checkpoint:** {last}", "",
                  "Continue where it stopped (same data and settings: the run folder is found again):", "",
                  f"    {how_to_continue or resume_command(folder.read_config())}"]
        path = folder / "failure.md"
    else:
        lines += ["No run folder of this run can take the note (none was made, another process holds it, or it "
                  "holds a finished run); fix the error and run the same command again"
                  + (f":\n\n    {how_to_continue}" if how_to_continue else ".")]
        path = out / "last_failure.md"
    if details:
        lines += ["", "## Details", "", "```", details.rstrip(), "```"]
    markdown = "\n".join(lines) + "\n"
    write_atomic(path, markdown)
    return path, markdown
