"""The nightly's purpose: a run's adapter, its base model and the champion are scored on the
operator's fixed evaluation set with the same code, the gate decides (gate.py), and the
registry on the output folder records the candidate and moves the champion (registry.py).

Each run writes its decision to promotion.json in its run folder (its report shows it); the
output folder's nightly.html shows every night's scores, champion changes marked."""

import hashlib
import html
import json
import re
from pathlib import Path

from .data import file_sha256, folder_sha256, read_chat_jsonl, write_atomic, write_json
from .engines import make_engine
from .errors import PipelineError
from .gate import Decision, decide
from .registry import Registry
from .render import render_conversations
from .run_folder import FINAL, PROMOTION, STATE, RunFolder

TREND_PAGE = "nightly.html"
# Checks an evaluation row may carry on the answer each model gives to its prompt (greedy):
# {"messages": [...], "checks": {"contains": "Arr!", "regex": "be \\d+", "json": true}}.
CHECKS = ("contains", "regex", "json")


def read_checks(eval_data: str, conversations: list[dict]) -> list[dict | None]:
    """Each evaluation row's checks (None: it has none), refused with the row's number where
    malformed."""
    out = []
    for n, row in enumerate(conversations, start=1):
        checks = row.get("checks")
        if checks is not None:
            unknown = set(checks) - set(CHECKS) if isinstance(checks, dict) else {"(not an object)"}
            if unknown or not checks:
                raise PipelineError(f"--eval-data {eval_data}: conversation {n}: checks {sorted(unknown) or '{}'}: "
                                    f"give an object of {', '.join(CHECKS)}")
            try:
                re.compile(checks.get("regex", ""))
            except re.error as e:
                raise PipelineError(f"--eval-data {eval_data}: conversation {n}: regex: {e}") from None
        out.append(checks)
    return out


def passes(answer: str, checks: dict) -> bool:
    if "contains" in checks and checks["contains"] not in answer:
        return False
    if "regex" in checks and not re.search(checks["regex"], answer):
        return False
    if checks.get("json"):
        try:
            json.loads(answer)
        except ValueError:
            return False
    return True


def check_rates(adapter: str, conversations: list[dict], checks: list, max_tokens: int, device: str, dtype: str,
                with_base: bool) -> dict:
    """The share of checked rows whose greedy answer passes its checks: the adapter's, and its
    base model's with `with_base`."""
    from .evaluate import compare
    from .settings import SampleSettings

    rows = [i for i, c in enumerate(checks) if c]
    prompts = [{**conversations[i], "messages": conversations[i]["messages"][:-1]} for i in rows]
    answers = compare(adapter, prompts, SampleSettings(compare_base=with_base, temperature=0, max_tokens=max_tokens,
                                                       device=device, dtype=dtype))["results"]
    return {who: sum(passes(r[f"{who}_response"], checks[i]) for i, r in zip(rows, answers)) / len(rows)
            for who in (("lora", "base") if with_base else ("lora",))}


def inputs_key(dataset: str, params: dict) -> str | None:
    """What a night's candidate is made from: the dataset's content (a local file or folder;
    None for a hub dataset, which is never taken as unchanged) and every parameter."""
    path = Path(dataset)
    if not path.exists():
        return None
    content = folder_sha256(path) if path.is_dir() else file_sha256(path)
    return hashlib.sha256(json.dumps([content, params], sort_keys=True, default=str).encode()).hexdigest()


def unchanged_night(output_dir: str, key: str | None) -> str | None:
    """The line a night with no new data says ("no new data since ..."), or None: there is
    new data or a changed setting, or no candidate yet."""
    registry = Registry(output_dir)
    same = [e for e in registry.history() if e.get("kind") == "candidate" and key and e.get("inputs_key") == key]
    if not same:
        return None
    champion = registry.champion()
    return (f"no new data since {same[-1]['time']}; the champion stays "
            f"{champion['run'] if champion else 'unset (no candidate has passed the gate yet)'}")


def eval_losses(run_config: dict, state: str | None, conversations: list, device: str, dtype: str) -> list[float]:
    """Each evaluation conversation's loss (mean NLL per trained token) under the saved
    training state `state` of a run with config.json `run_config`, or under its base model
    (None: a fresh LoRA, whose second matrix is zero, changes nothing)."""
    engine = make_engine(run_config["backend"], run_config["base_model"], rank=run_config["rank"], seed=0,
                         request_timeout=run_config["request_timeout"], device=device, dtype=dtype)
    try:
        if state:
            engine.load_state(state)
        examples, report = render_conversations(conversations, engine.renderer, run_config["max_length"],
                                                run_config["on_overflow"])
        if report.dropped:  # every night must score the very same examples
            raise PipelineError(f"--eval-data: {report.summary()}; every example must be scored each night: "
                                "fix or remove the dropped ones")
        losses = []
        for i in range(0, len(examples), 8):
            chunk = examples[i:i + 8]
            for datum, row in zip(chunk, engine.forward(chunk).result().loss_fn_outputs):
                weights = datum.loss_fn_inputs["weights"].to_torch().float()
                losses.append(float(-(row["logprobs"].to_torch().float() * weights).sum() / weights.sum()))
        return losses
    finally:
        engine.close()


def _state_of(run_dir: str) -> str:
    """The saved training state of a finished run (a folder, or tinker:// on Tinker)."""
    [state] = [e.state_path for e in RunFolder(run_dir).registry() if e.name == STATE] or [None]
    if not state:
        raise PipelineError(f"{run_dir} holds no {STATE} in checkpoints.jsonl: it did not finish; train it to the end")
    return state


def judge(run_dir: str, eval_data: str, margin: float, output_dir: str, key: str | None,
          max_tokens: int = 150, device: str = "auto", dtype: str = "auto") -> Decision:
    """The candidate in `run_dir` against its base model and the champion on `eval_data`;
    the decision is recorded in the registry and in the run folder. The gate decides on the
    losses; the answer checks' pass rates (`max_tokens` an answer) are recorded and said
    beside them. A run judged before (a re-run of the same night) keeps its first decision."""
    registry = Registry(output_dir)
    run = Path(run_dir).name
    earlier = next((e for e in registry.history() if e.get("kind") == "candidate" and e["run"] == run), None)
    if earlier and earlier.get("decision"):
        return Decision.from_json(earlier["decision"])
    conversations = read_chat_jsonl(Path(eval_data), "--eval-data")
    checks = read_checks(eval_data, conversations)
    config = RunFolder(run_dir).read_config()
    scores = {"candidate": eval_losses(config, _state_of(run_dir), conversations, device, dtype),
              "base": eval_losses(config, None, conversations, device, dtype)}
    champion = registry.champion()
    if champion:
        champion_config = RunFolder(champion["run_dir"]).read_config()
        if champion_config["base_model"] != config["base_model"]:
            raise PipelineError(f"the champion {champion['run']} was trained on {champion_config['base_model']}, this "
                                f"run on {config['base_model']}: their losses are not comparable. Promote one by hand "
                                "(lora-pipeline promote RUN)")
        scores["champion"] = eval_losses(champion_config, _state_of(champion["run_dir"]), conversations, device, dtype)
    decision = decide(scores["candidate"], scores["base"], scores.get("champion"), margin=margin,
                      champion_name=champion and champion["run"])
    means = {f"eval_loss_{who}": sum(s) / len(s) for who, s in scores.items()}
    if any(checks):
        rates = check_rates(str(Path(run_dir) / FINAL), conversations, checks, max_tokens, device, dtype, True)
        means |= {"checks_candidate": rates["lora"], "checks_base": rates["base"]}
        if champion:
            means["checks_champion"] = check_rates(champion["adapter"], conversations, checks, max_tokens,
                                                   device, dtype, False)["lora"]
        said = ", ".join(f"{who} {means[f'checks_{who}']:.0%}" for who in ("candidate", "base", "champion")
                         if f"checks_{who}" in means)
        decision = Decision(decision.promoted, f"{decision.reason}; answer checks passed: {said}",
                            decision.comparisons)
    summary = RunFolder(run_dir).read_summary()
    registry.record_candidate({"run": run, "run_dir": str(Path(run_dir).resolve()),
                               "adapter": str(Path(run_dir).resolve() / FINAL),
                               "tinker": next((c.sampler_path for c in summary.checkpoints
                                               if c.name == FINAL and str(c.sampler_path).startswith("tinker://")),
                                              None),
                               "data_sha256": config["data_sha256"], "inputs_key": key,
                               "metrics": {**means, "examples": len(scores["base"])}}, decision)
    write_json(Path(run_dir) / PROMOTION, {**decision.to_json(), "metrics": means})
    write_trend(output_dir)
    return decision


def trend_rows(output_dir: str) -> list[dict]:
    """One row per judged night, oldest first, and whether the champion changed with it (by
    the gate, or by a person's promote or rollback, shown on the row of the run they chose)."""
    rows = []
    for e in Registry(output_dir).history():
        if e.get("kind") == "candidate":
            rows.append({"time": e["time"], "run": e["run"], **e.get("metrics", {}),
                         "decision": (e.get("decision") or {}).get("reason", "not judged"),
                         "champion": bool((e.get("decision") or {}).get("promoted"))})
        else:
            rows.append({"time": e["time"], "run": e["run"], "decision": f"{e['kind']} by {e.get('who')}: "
                         f"{e.get('why') or 'no reason given'}", "champion": True})
    return rows


TREND_COLUMNS = ["night", "run", "eval loss", "base", "champion before", "answer checks", "decision"]
TREND_NUMBERS = {"eval loss", "base", "champion before", "answer checks"}  # right-aligned in nightly.html


def trend_cells(row: dict) -> list[str]:
    """A trend row as the text of its TREND_COLUMNS, for the artifact and nightly.html alike."""
    return [row["time"], row["run"], _num(row.get("eval_loss_candidate")), _num(row.get("eval_loss_base")),
            _num(row.get("eval_loss_champion")), _pct(row.get("checks_candidate")), row["decision"]]


def trend_markdown(output_dir: str) -> str:
    lines = ["| " + " | ".join(TREND_COLUMNS) + " |", "|" + "---|" * len(TREND_COLUMNS)]
    for r in trend_rows(output_dir):
        cells = [c.replace("|", "/") for c in trend_cells(r)]
        if r["champion"]:
            cells[1] = f"**{cells[1]}** (champion)"
        lines.append("| " + " | ".join(cells) + " |")
    champion = Registry(output_dir).champion()
    return (f"# lora-pipeline nightly\n\nChampion: **{champion['run'] if champion else 'none yet'}**\n\n"
            + "\n".join(lines) + "\n")


def write_trend(output_dir: str) -> str:
    """nightly.html in the output folder: every night's evaluation-set losses, plotted and as a
    table, champion changes marked. Returns its path."""
    import base64

    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from .report import _STYLE, _png, _table, _td

    every = trend_rows(output_dir)
    rows = [r for r in every if "eval_loss_candidate" in r]
    fig = Figure(figsize=(7.5, 3.6), dpi=110, layout="constrained")
    ax = fig.subplots()
    x = list(range(1, len(rows) + 1))
    ax.plot(x, [r["eval_loss_candidate"] for r in rows], "o-", label="candidate")
    ax.plot(x, [r["eval_loss_base"] for r in rows], "s--", alpha=0.6, label="base model")
    promoted = [(i, r["eval_loss_candidate"]) for i, r in zip(x, rows) if r["champion"]]
    ax.plot([p[0] for p in promoted], [p[1] for p in promoted], "*", markersize=14, label="promoted to champion")
    ax.set_xlabel("night")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # nights are whole; no tick at 1.5
    ax.set_yscale("log")  # the base model's loss is many times the adapters': on a linear axis theirs look flat
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
    ax.set_ylabel("evaluation-set loss (nats/token, log scale)")
    ax.grid(alpha=0.3)
    ax.legend()
    png = base64.b64encode(_png(fig)).decode()
    champion = Registry(output_dir).champion()
    page = "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>lora-pipeline nightly</title><style>{_STYLE}</style>",
        "</head><body><h1>lora-pipeline nightly</h1>",
        f"<p>Champion: <code>{html.escape(champion['run']) if champion else 'none yet'}</code></p>",
        f'<img alt="evaluation-set loss per night" src="data:image/png;base64,{png}">',
        _table(TREND_COLUMNS,
               [[_td(c, "num" if col in TREND_NUMBERS else "") for col, c in zip(TREND_COLUMNS, trend_cells(r))]
                for r in every],
               lambda i: "best" if every[i]["champion"] else ""),
        "</body></html>"])
    path = Path(output_dir) / TREND_PAGE
    write_atomic(path, page + "\n")
    return str(path)


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def _pct(value) -> str:
    return f"{value:.0%}" if isinstance(value, float | int) and not isinstance(value, bool) else "-"
