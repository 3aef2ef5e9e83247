"""Datasets in, validated chat JSONL out; and reading that JSONL back for training."""

import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from .errors import PipelineError

ROLES = ("system", "user", "assistant")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def umask_mode(mode: int) -> int:
    """`mode` less the process umask: what a plain open() or mkdir() would have given.
    (mkstemp and mkdtemp create private files; our outputs are ordinary ones.)"""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def problem(messages) -> str | None:
    """Why a conversation cannot be trained on, or None."""
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return "missing or unknown role"
        if not isinstance(m.get("content"), str):
            return "non-string content"
        if not m["content"].strip():
            return "empty content"
    if messages[-1]["role"] != "assistant":
        return "does not end with an assistant turn"
    return None


def to_messages(row: dict):
    """A row of any common chat shape as OpenAI-style messages (None if no shape fits)."""
    if "messages" in row:
        return row["messages"]
    if "conversations" in row and isinstance(row["conversations"], list):
        return [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                for t in row["conversations"] if isinstance(t, dict)]
    if "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    for q, a in (("prompt", "completion"), ("question", "answer")):
        if q in row and a in row:
            return [{"role": "user", "content": row[q]}, {"role": "assistant", "content": row[a]}]
    return None


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS)
        if not files:
            raise PipelineError(f"{path}: no {'/'.join(LOCAL_FORMATS)} files in this folder")
        return files
    if path.suffix not in LOCAL_FORMATS:
        raise PipelineError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    return [path]


def load_rows(dataset: str, split: str, max_examples: int | None):
    """Rows of a local file or folder, or of a hub dataset (streamed, so that the first N rows
    of a large dataset do not need the whole download)."""
    import datasets

    path = Path(dataset).expanduser()
    try:
        if path.exists():
            files = _local_files(path)
            kinds = {LOCAL_FORMATS[f.suffix] for f in files}
            if len(kinds) > 1:
                raise PipelineError(f"{path}: mixes file types {sorted(kinds)}; keep one type per folder")
            ds = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train",
                                       streaming=True)
        elif dataset.endswith(tuple(LOCAL_FORMATS)) or dataset.startswith((".", "/", "~")):
            raise PipelineError(f"--dataset {dataset}: file not found")
        else:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
        for i, row in enumerate(ds):
            if max_examples and i >= max_examples:
                break
            yield row
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"--dataset {dataset} (split {split}): cannot read it: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None


def prepare(dataset: str, split: str, output: Path, max_examples: int | None = None) -> dict:
    """Convert a dataset to `{"messages": [...]}` JSONL, keeping only trainable conversations.

    Returns the report (also written to `<output>.report.json`): rows read, kept, and dropped
    by reason with the first row numbers of each.
    """
    output = Path(output)
    kept: list[str] = []
    dropped: Counter = Counter()
    examples: dict[str, list[int]] = {}
    read = 0
    for read, row in enumerate(load_rows(dataset, split, max_examples), start=1):
        messages = to_messages(row)
        reason = "no known chat shape" if messages is None else problem(messages)
        if reason:
            dropped[reason] += 1
            examples.setdefault(reason, [])
            if len(examples[reason]) < 5:
                examples[reason].append(read)
            continue
        kept.append(json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]},
                               ensure_ascii=False))
    if read == 0:
        raise PipelineError(f"--dataset {dataset}: no rows to read")
    if not kept:
        raise PipelineError(f"--dataset {dataset}: none of {read} rows is a usable conversation "
                            f"({dict(dropped)}); see the README for the shapes understood")
    report = {
        "dataset": dataset, "split": split, "output": str(output), "rows_read": read,
        "kept": len(kept), "dropped": dict(dropped), "dropped_examples_rows": examples,
    }
    write_atomic(output, "\n".join(kept) + "\n")
    write_json(output.with_name(output.name + ".report.json"), report)
    return report


def read_chat_jsonl(path: Path) -> list[list[dict]]:
    """Conversations of a prepared data file. Strict: training data is expected to come out of
    `prepare`, so any bad line is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--data {path}: file not found; create it with `lora-pipeline prepare`")
    conversations = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise PipelineError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{n}: not valid JSON ({e.msg}); fix the line or rebuild the "
                                "file with `lora-pipeline prepare`") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        reason = "no \"messages\" list" if messages is None else problem(messages)
        if reason:
            raise PipelineError(f"{path}:{n}: {reason}; fix the line or rebuild the file with "
                                "`lora-pipeline prepare`")
        conversations.append(messages)
    if not conversations:
        raise PipelineError(f"--data {path}: the file holds no conversations")
    return conversations
