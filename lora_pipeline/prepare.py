"""Any common dataset shape in, validated chat JSONL out, every row accounted for.

A row that cannot be trained on is dropped with its reason and its line (or row) number, and
counted in `<output>.report.json`; `strict` fails on the first one instead.
"""

import json
import os
import random
from collections import Counter
from pathlib import Path

from .data import BOM, ROLES, check_input_file, check_output_file, held_out_path, problem, slug, write_atomic, write_json
from .errors import PipelineError
from .settings import FORMATS, PrepareSettings

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "bot": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
EXAMPLES_PER_REASON = 5
# A row this large is dropped unread: parsing and tokenizing it would take minutes and gigabytes,
# and 4 MiB of text is about a million tokens, far past any --max-length worth training on.
MAX_ROW_BYTES = 4 << 20
TOO_LARGE = f"row larger than {MAX_ROW_BYTES >> 20} MiB"


class Bad(ValueError):
    """A row that cannot become a conversation; the message is the reason reported."""


def _text(value, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise Bad("non-string content")
    if not empty_ok and not value.strip():
        raise Bad("empty content")
    return value


def _json_value(value):
    """A value that may come JSON-encoded in a string (ShareGPT's tools and calls, OpenAI's
    arguments)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return None
    return value


def _tool_calls(value) -> list[dict]:
    """OpenAI's `tool_calls` or a ShareGPT `function_call` turn (one call or a list) in the
    normal form `{"type": "function", "function": {"name", "arguments": {...}}}`."""
    calls = _json_value(value)
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = _json_value(function.get("arguments", {})) if isinstance(function, dict) else None
        if not (isinstance(name, str) and name.strip() and isinstance(arguments, dict)):
            raise Bad("malformed tool call")
        out.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    if not out:
        raise Bad("malformed tool call")
    return out


def _tools(value) -> list[dict]:
    """A tools column (a list, or ShareGPT's JSON string of one) in OpenAI's form."""
    if value is None or value == "":
        return []
    tools = _json_value(value)
    if not isinstance(tools, list):
        raise Bad("malformed tools list")
    out = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise Bad("malformed tools list")
        out.append({"type": "function", "function": function})
    return out


def _message(m) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise Bad("missing or unknown role")
    role = "tool" if m["role"] == "function" else m["role"]
    if role not in ROLES:
        raise Bad("missing or unknown role")
    calls = m.get("tool_calls") or (m.get("function_call") and [m["function_call"]])
    if role == "assistant" and calls:
        content = "" if m.get("content") is None else _text(m["content"], empty_ok=True)
        return {"role": role, "content": content, "tool_calls": _tool_calls(calls)}
    return {"role": role, "content": _text(m.get("content"))}


def _sharegpt_turn(t) -> dict:
    if not isinstance(t, dict) or not isinstance(t.get("from"), str) or t["from"] not in SHAREGPT_ROLES:
        raise Bad("missing or unknown role")
    if t["from"] == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(_text(t.get("value")))}
    return {"role": SHAREGPT_ROLES[t["from"]], "content": _text(t.get("value"))}


def _system(row: dict) -> list[dict]:
    return [{"role": "system", "content": _text(row["system"])}] if row.get("system") not in (None, "") else []


def _conversation(row: dict, fmt: str, columns: dict) -> dict:
    """A row of the given shape (or of any known one, for "auto") in the normal form
    `{"messages": [...], "tools": [...]}`; raises Bad with the reason it cannot be one."""
    if fmt == "columns":
        if columns["prompt"] not in row or columns["response"] not in row:
            raise Bad("no known chat shape")
        system = [{"role": "system", "content": _text(row.get(columns["system"]))}] if columns.get("system") else []
        messages = system + [{"role": "user", "content": _text(row[columns["prompt"]])},
                             {"role": "assistant", "content": _text(row[columns["response"]])}]
    elif fmt in ("auto", "messages") and isinstance(row.get("messages"), list):
        messages = [_message(m) for m in row["messages"]]
    elif fmt in ("auto", "sharegpt") and isinstance(row.get("conversations"), list):
        messages = _system(row) + [_sharegpt_turn(t) for t in row["conversations"]]
    elif fmt in ("auto", "alpaca") and "instruction" in row and "output" in row:
        messages = _system(row)
        history = row.get("history") or []
        if not isinstance(history, list):
            raise Bad("malformed history")
        for turn in history:  # [[user, assistant], ...]
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise Bad("malformed history")
            messages += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
        extra = row.get("input")
        prompt = _text(row["instruction"]) + (f"\n\n{_text(extra)}" if extra is not None and extra != "" else "")
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row["output"])}]
    elif fmt in ("auto", "prompt_completion") and "prompt" in row and "completion" in row and not isinstance(row["prompt"], list):
        messages = [{"role": "user", "content": _text(row["prompt"])}, {"role": "assistant", "content": _text(row["completion"])}]
    elif fmt in ("auto", "question_answer") and "question" in row and "answer" in row:
        messages = [{"role": "user", "content": _text(row["question"])}, {"role": "assistant", "content": _text(row["answer"])}]
    else:
        raise Bad("no known chat shape")
    tools = _tools(row.get("tools"))
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def _local_files(path: Path) -> list[Path]:
    """The data files of a local --dataset, each checked to be a regular file before it is read
    or hashed (a FIFO or a link to /dev/zero in the folder would hang both)."""
    check_input_file(path, "--dataset", folder_ok=True, empty_ok=True)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS and not p.name.startswith(".")
                       and not p.is_dir())
        for f in files:
            check_input_file(f, "--dataset", empty_ok=True)
        if not files:
            raise PipelineError(f"{path}: no {'/'.join(LOCAL_FORMATS)} files in this folder")
        if len({LOCAL_FORMATS[f.suffix] for f in files}) > 1:
            raise PipelineError(f"{path}: mixes file types; keep one type per folder")
        return files
    if path.suffix not in LOCAL_FORMATS:
        raise PipelineError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    return [path]


def _parse(raw: bytes) -> tuple[object, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non-UTF-8 text"
    try:
        return json.loads(text), None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
        return None, "unparseable line"


def _jsonl_rows(path: Path):
    """(where, row or None, reason): read by line, so a bad line is reported, not fatal. A line
    over MAX_ROW_BYTES is skipped in blocks, never held in memory whole. A BOM before the first
    line is not part of it."""
    with open(path, "rb") as f:
        if f.read(len(BOM)) != BOM:
            f.seek(0)
        n = 0
        while raw := f.readline(MAX_ROW_BYTES + 1):
            n += 1
            where = f"{path.name}:{n}"
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                while (block := f.readline(1 << 20)) and not block.endswith(b"\n"):
                    pass
                yield where, None, TOO_LARGE
                continue
            if raw.strip():
                yield (where, *_parse(raw))


def _json_rows(path: Path):
    """A .json file: an array of rows (read whole, as `datasets` would), or JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_rows(path)
        return
    rows, reason = _parse(path.read_bytes().removeprefix(BOM))
    if reason:
        raise PipelineError(f"--dataset {path}: {reason.replace('line', 'JSON array')}; fix the file or "
                            "write it as JSON Lines (.jsonl), where a bad line is only dropped")
    for n, row in enumerate(rows, start=1):
        yield f"{path.name}:row {n}", row, None


def _rows(dataset: str, split: str, config_name: str | None):
    """(where, row, reason) for every row of a local file or folder, or of a hub dataset
    (streamed, so the first rows of a large dataset do not need the whole download)."""
    import datasets

    path = Path(dataset).expanduser()
    # A folder laid out as a hub dataset repository (data/<split>-00000-of-00001.parquet, a
    # README card) is read as the hub would read it, splits and all.
    hub_layout = path.is_dir() and ((path / "data").is_dir() or (path / "README.md").exists())
    try:
        if path.exists() and not hub_layout:
            for f in _local_files(path):
                if f.suffix in (".jsonl", ".json"):
                    yield from (_jsonl_rows if f.suffix == ".jsonl" else _json_rows)(f)
                    continue
                ds = datasets.load_dataset(LOCAL_FORMATS[f.suffix], data_files=[str(f)], split="train", streaming=True)
                for n, row in enumerate(ds, start=1):
                    yield f"{f.name}:row {n}", row, None
            return
        ds = datasets.load_dataset(str(path) if hub_layout else dataset, config_name, split=split, streaming=True)
        for n, row in enumerate(ds, start=1):
            yield f"{split} row {n}", row, None
    except PipelineError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise PipelineError(f"--dataset {dataset} (split {split}): cannot read it: {type(e).__name__}: {first}") from None


def _sample(rows, max_examples: int | None, first: bool, seed: int):
    """The first N rows, or a seeded uniform sample of N (reservoir: one pass, N in memory)."""
    if not max_examples:
        yield from rows
        return
    if first:
        for i, row in enumerate(rows):
            if i >= max_examples:
                return
            yield row
        return
    rng, kept = random.Random(seed), []
    for i, row in enumerate(rows):
        if i < max_examples:
            kept.append((i, row))
        elif (j := rng.randint(0, i)) < max_examples:
            kept[j] = (i, row)
    yield from (row for _, row in sorted(kept, key=lambda x: x[0]))


def local_inputs(dataset: str) -> list[Path]:
    """The local files a --dataset names, checked to be regular files (none for a hub id, whose
    hub is checked to answer: streaming from an unreachable one took a minute of retries)."""
    path = Path(dataset).expanduser()
    if not path.exists() and not path.is_symlink():
        if dataset.endswith(tuple(LOCAL_FORMATS)) or dataset.startswith((".", "/", "~")):
            raise PipelineError(f"--dataset {dataset}: file not found")
        from .models import hub_reachable

        if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or not hub_reachable():
            raise PipelineError(f"--dataset {dataset}: no such local file or folder, and the Hugging Face hub, "
                                "where a dataset id is read from, cannot be reached; connect to the network (or "
                                "unset HF_HUB_OFFLINE), or give a local file")
        return []
    if path.is_dir() and ((path / "data").is_dir() or (path / "README.md").exists()):  # a hub layout
        return [p for p in path.rglob("*") if p.is_file()]
    return _local_files(path)


def check_paths(dataset: str, output: str | Path | None) -> None:
    """Before anything is read: the input is what it should be (regular files, or a folder of
    them), and the files prepare writes (the output, its held-out split, its report) are neither
    the input nor anything but regular files."""
    inputs = local_inputs(dataset)
    if not output:
        return
    output = Path(output)
    for path, what in ((output, ""), (held_out_path(output), "its held-out split"),
                       (output.with_name(output.name + ".report.json"), "its report")):
        check_output_file(path, "--output", inputs, what)


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": v[-1]}


def prepare(dataset: str, split: str, output: Path, max_examples: int | None = None, *,
            config_name: str | None = None, fmt: str = "auto", columns: dict | None = None,
            first: bool = False, seed: int = 0, val_fraction: float = 0.0, max_length: int | None = None,
            on_overflow: str = "truncate", base_model: str | None = None, strict: bool = False) -> dict:
    """Convert a dataset to `{"messages": [...], "tools": [...]}` JSONL (and a seeded
    validation split) and return the report, also written to `<output>.report.json`.

    With `max_length`, every kept row is rendered with the base model's chat template as
    training will render it: token statistics, and rows dropped for what training would drop
    them for (too long with `on_overflow="drop"`, no assistant token within the limit, not
    renderable by the template)."""
    from .render import fit, renderer_for  # torch and tinker: imported when used

    if fmt not in FORMATS:
        raise PipelineError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "columns" and not (columns and columns.get("prompt") and columns.get("response")):
        raise PipelineError("--format columns needs --prompt-column and --response-column")
    if not 0 <= val_fraction < 1:
        raise PipelineError("--val-fraction must be at least 0 and below 1")
    check_paths(dataset, output)
    output = Path(output)
    renderer = None
    if max_length:
        from .models import SMOLLM2, load_tokenizer

        model = base_model or SMOLLM2
        renderer = renderer_for(model, load_tokenizer(model))

    kept, seen = [], set()  # kept: (where, row, JSON line)
    dropped, examples = Counter(), {}
    read = 0

    def drop(where: str, reason: str) -> None:
        if strict:
            raise PipelineError(f"{where}: {reason} (--strict stops at the first bad row; without it the "
                                "row is dropped and reported)")
        dropped[reason] += 1
        if len(examples.setdefault(reason, [])) < EXAMPLES_PER_REASON:
            examples[reason].append(where)

    for where, row, reason in _sample(_rows(dataset, split, config_name), max_examples, first, seed):
        read += 1
        if reason is None and not isinstance(row, dict):
            reason = "no known chat shape"
        if reason is None:
            try:
                row = _conversation(row, fmt, columns or {})
                reason = problem(row)
            except Bad as e:
                reason = str(e)
            except RecursionError:  # a value nested deeper than Python's stack
                reason = "nested too deeply"
        if reason:
            drop(where, reason)
            continue
        line = json.dumps(row, ensure_ascii=False)
        if len(line.encode()) > MAX_ROW_BYTES:  # rows from files read whole (.json arrays, parquet, csv)
            drop(where, TOO_LARGE)
        elif line in seen:
            drop(where, "exact duplicate")
        else:
            seen.add(line)
            kept.append((where, row, line))

    lengths, assistant_tokens, truncated = [], [], 0
    if renderer is not None:
        within, chunk = [], 256
        for start in range(0, len(kept), chunk):
            part = kept[start:start + chunk]
            for (where, row, line), encoded in zip(part, renderer.encode([row for _, row, _ in part])):
                reason, cut, trained = fit(encoded, max_length, on_overflow)
                if reason:
                    drop(where, reason)
                    continue
                truncated += cut
                lengths.append(min(len(encoded[0]), max_length))
                assistant_tokens.append(trained)
                within.append((where, row, line))
        kept = within
    tool_rows = sum(any(m.get("tool_calls") for m in row["messages"]) for _, row, _ in kept)
    kept = [line for _, _, line in kept]

    if read == 0:
        raise PipelineError(f"--dataset {dataset}: no rows to read")
    if not kept:
        raise PipelineError(f"--dataset {dataset}: none of {read} rows is a usable conversation "
                            f"({dict(dropped)}); see the README for the shapes understood")
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n_val = round(len(kept) * val_fraction)
    val_rows = set(order[:n_val])
    train = [line for i, line in enumerate(kept) if i not in val_rows]
    val = [line for i, line in enumerate(kept) if i in val_rows]
    val_path = held_out_path(output) if val else None
    report = {
        "dataset": dataset, "split": split, "output": str(output), "validation": str(val_path) if val else None,
        "rows_read": read, "kept": len(kept), "train": len(train), "val": len(val), "tool_call_rows": tool_rows,
        "dropped": dict(dropped), "dropped_examples": examples,
    }
    if renderer is not None:
        train_tokens = sum(n for i, n in enumerate(lengths) if i not in val_rows)
        report.update(max_length=max_length, on_overflow=on_overflow, truncated=truncated,
                      token_quantiles=_quantiles(lengths), assistant_tokens=sum(assistant_tokens),
                      train_tokens_per_epoch=train_tokens)
    write_atomic(output, "\n".join(train) + "\n")
    if val:
        write_atomic(val_path, "\n".join(val) + "\n")
    else:  # an earlier split beside the file would be taken for this one's held-out data
        held_out_path(output).unlink(missing_ok=True)
    write_json(output.with_name(output.name + ".report.json"), report)
    return report


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"Kept {report['kept']} of {report['rows_read']} rows: {report['train']} -> {report['output']}"
             + (f", {report['val']} -> {report['validation']}" if report["val"] else "")
             + (f"; {report['tool_call_rows']} with tool calls" if report["tool_call_rows"] else "")]
    for reason, n in sorted(report["dropped"].items(), key=lambda x: -x[1]):
        lines.append(f"  dropped {n}: {reason} (e.g. {', '.join(report['dropped_examples'][reason][:3])})")
    if "token_quantiles" in report:
        q = report["token_quantiles"]
        lines.append(f"  tokens per example p50 {q['p50']}, p90 {q['p90']}, p99 {q['p99']}, max {q['max']}; "
                     f"{report['truncated']} truncated at {report['max_length']}; "
                     f"~{report['train_tokens_per_epoch']} training tokens per epoch")
    lines.append(f"  report: {report['output']}.report.json")
    return "\n".join(lines)


def prepare_data_file(s: PrepareSettings) -> dict:
    """`prepare` with a stage's settings, checked first."""
    s.check()
    return prepare(s.dataset, s.split, Path(s.output), s.max_examples, config_name=s.config_name, fmt=s.fmt,
                   columns={"prompt": s.prompt_column, "response": s.response_column, "system": s.system_column},
                   first=s.first, seed=s.seed, val_fraction=s.val_fraction, max_length=s.max_length,
                   on_overflow=s.on_overflow, base_model=s.base_model, strict=s.strict)


def prepared_path(output_dir: str | Path, dataset: str, split: str, max_examples: int | None) -> str:
    """Where the pipeline puts a dataset's prepared file, named after its source so that two
    sources never share one: a local file's stem, or the hub id and split (the split means
    nothing for local files, which are read whole)."""
    source = Path(dataset).stem if Path(dataset).exists() else f"{dataset}_{split}"
    return str(Path(output_dir) / "data" / f"{slug(source)}_{max_examples or 'all'}.jsonl")
