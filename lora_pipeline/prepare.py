"""Any common dataset shape in, validated chat JSONL out, every row accounted for.

A row that cannot be trained on is dropped with its reason and its line (or row) number, and
counted in `<output>.report.json`; `strict` fails on the first one instead.
"""

import json
import random
from collections import Counter
from pathlib import Path

from .data import held_out_path, problem, slug, write_atomic, write_json
from .errors import PipelineError
from .settings import FORMATS, PrepareSettings

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "bot": "assistant"}
EXAMPLES_PER_REASON = 5


def _messages(row: dict, fmt: str, columns: dict) -> list | None:
    """A row of the given shape (or of any known one, for "auto") as OpenAI-style messages."""
    if fmt == "columns":
        system = [{"role": "system", "content": row.get(columns["system"])}] if columns.get("system") else []
        if columns["prompt"] not in row or columns["response"] not in row:
            return None
        return system + [{"role": "user", "content": row[columns["prompt"]]},
                         {"role": "assistant", "content": row[columns["response"]]}]
    if fmt in ("auto", "messages") and isinstance(row.get("messages"), list):
        return row["messages"]
    if fmt in ("auto", "sharegpt") and isinstance(row.get("conversations"), list):
        # Tool turns (function_call, observation, tool) keep their role and are reported.
        return [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")) if isinstance(t, dict) else None,
                 "content": t.get("value") if isinstance(t, dict) else None} for t in row["conversations"]]
    if fmt in ("auto", "alpaca") and "instruction" in row and "output" in row:
        messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        for turn in row.get("history") or []:  # [[user, assistant], ...]
            if isinstance(turn, (list, tuple)) and len(turn) == 2:
                messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        prompt = row["instruction"] + (f"\n\n{row['input']}" if isinstance(row.get("input"), str) and row["input"] else "")
        return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if fmt in ("auto", "prompt_completion") and "prompt" in row and "completion" in row and not isinstance(row["prompt"], list):
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    if fmt in ("auto", "question_answer") and "question" in row and "answer" in row:
        return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    return None


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS and not p.name.startswith("."))
        if not files:
            raise PipelineError(f"{path}: no {'/'.join(LOCAL_FORMATS)} files in this folder")
        if len({LOCAL_FORMATS[f.suffix] for f in files}) > 1:
            raise PipelineError(f"{path}: mixes file types; keep one type per folder")
        return files
    if path.suffix not in LOCAL_FORMATS:
        raise PipelineError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    return [path]


def _jsonl_rows(path: Path):
    """(where, row or None, reason): read by line, so a bad line is reported, not fatal."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path.name}:{n}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield where, None, "non-UTF-8 text"
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                yield where, None, "unparseable line"
                continue
            yield (where, row, None) if isinstance(row, dict) else (where, None, "unparseable line")


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
                if f.suffix == ".jsonl":
                    yield from _jsonl_rows(f)
                    continue
                ds = datasets.load_dataset(LOCAL_FORMATS[f.suffix], data_files=[str(f)], split="train", streaming=True)
                for n, row in enumerate(ds, start=1):
                    yield f"{f.name}:row {n}", row, None
            return
        if not path.exists() and (dataset.endswith(tuple(LOCAL_FORMATS)) or dataset.startswith((".", "/", "~"))):
            raise PipelineError(f"--dataset {dataset}: file not found")
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


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": v[-1]}


class TokenCounter:
    """Token counts as the renderer makes them, for many conversations at once.

    The renderer tokenizes each message's content apart from the role markers around it, so a
    conversation's length is the sum of its contents' token counts (one batched call to the
    fast tokenizer for thousands of messages) plus the markers' tokens, which depend only on
    the sequence of roles and are measured once per sequence. tests/test_data.py checks the
    counts against the renderer's own."""

    def __init__(self, renderer, tokenizer):
        self.renderer, self.tokenizer = renderer, tokenizer
        self.markers: dict[tuple, tuple[int, int]] = {}

    def _markers(self, roles: tuple) -> tuple[int, int]:
        """(all tokens, trained tokens) of a conversation of `roles` with one-token contents,
        less those contents."""
        if roles not in self.markers:
            from tinker_cookbook.renderers import TrainOnWhat

            model_input, weights = self.renderer.build_supervised_example(
                [{"role": r, "content": "x"} for r in roles], train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
            self.markers[roles] = (model_input.length - len(roles),
                                   int(weights.sum()) - roles.count("assistant"))
        return self.markers[roles]

    def count(self, conversations: list[list[dict]], chunk: int = 2000) -> list[tuple[int, int]]:
        """(tokens, trained assistant tokens) per conversation."""
        counts = []
        for start in range(0, len(conversations), chunk):
            part = conversations[start:start + chunk]
            ids = self.tokenizer([m["content"] for c in part for m in c], add_special_tokens=False)["input_ids"]
            i = 0
            for conversation in part:
                roles = tuple(m["role"] for m in conversation)
                total, trained = self._markers(roles)
                for m in conversation:
                    total += len(ids[i])
                    trained += len(ids[i]) if m["role"] == "assistant" else 0
                    i += 1
                counts.append((total, trained))
        return counts


def prepare(dataset: str, split: str, output: Path, max_examples: int | None = None, *,
            config_name: str | None = None, fmt: str = "auto", columns: dict | None = None,
            first: bool = False, seed: int = 0, val_fraction: float = 0.0, max_length: int | None = None,
            on_overflow: str = "truncate", base_model: str | None = None, strict: bool = False) -> dict:
    """Convert a dataset to `{"messages": [...]}` JSONL (and a seeded validation split) and
    return the report, also written to `<output>.report.json`."""
    if fmt not in FORMATS:
        raise PipelineError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "columns" and not (columns and columns.get("prompt") and columns.get("response")):
        raise PipelineError("--format columns needs --prompt-column and --response-column")
    if not 0 <= val_fraction < 1:
        raise PipelineError("--val-fraction must be at least 0 and below 1")
    output = Path(output)
    counter = None
    if max_length:
        from .models import SMOLLM2, load_tokenizer
        from .render import renderer_for

        model = base_model or SMOLLM2
        tokenizer = load_tokenizer(model)
        counter = TokenCounter(renderer_for(model, tokenizer), tokenizer)

    kept, seen = [], set()  # kept: (where, messages, JSON line)
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
        if reason:
            drop(where, reason)
            continue
        messages = _messages(row, fmt, columns or {})
        reason = "no known chat shape" if messages is None else problem(messages)
        if reason:
            drop(where, reason)
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        line = json.dumps({"messages": messages}, ensure_ascii=False)
        if line in seen:
            drop(where, "exact duplicate")
            continue
        seen.add(line)
        kept.append((where, messages, line))

    lengths, assistant_tokens, truncated = [], [], 0
    if counter is not None:
        counted = counter.count([messages for _, messages, _ in kept])
        within = []
        for (where, messages, line), (length, trained) in zip(kept, counted):
            if length > max_length:
                if on_overflow == "drop":
                    drop(where, f"longer than {max_length} tokens")
                    continue
                truncated += 1
            lengths.append(min(length, max_length))
            assistant_tokens.append(trained)
            within.append((where, messages, line))
        kept = within
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
        "rows_read": read, "kept": len(kept), "train": len(train), "val": len(val),
        "dropped": dict(dropped), "dropped_examples": examples,
    }
    if counter is not None:
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
             + (f", {report['val']} -> {report['validation']}" if report["val"] else "")]
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
