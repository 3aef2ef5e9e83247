"""Files: atomic writes, content hashes, and the chat JSONL that training reads."""

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import PipelineError

ROLES = ("system", "user", "assistant", "tool")


def umask_mode(mode: int) -> int:
    """`mode` less the process umask: what a plain open() or mkdir() would have given.
    (mkstemp and mkdtemp create private files; our outputs are ordinary ones.)"""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


# A UTF-8 byte order mark: editors on Windows start text files with it. It is not text.
BOM = b"\xef\xbb\xbf"


def _kind(mode: int) -> str:
    """What a file's mode says it is, in words."""
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def check_input_file(path: str | Path, flag: str, *, folder_ok: bool = False, empty_ok: bool = False) -> Path:
    """`path` if it is a regular file (or, with `folder_ok`, a folder), checked before anything
    reads or hashes it: a device such as /dev/zero or a FIFO would never end, or never start.
    Links are followed, as a read would follow them."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PipelineError(f"{flag} {path}: file not found") from None
    except OSError as e:
        raise PipelineError(f"{flag} {path}: cannot be read ({e.strerror}); check the path") from None
    if stat.S_ISDIR(mode) and folder_ok:
        return path
    if not stat.S_ISREG(mode):
        raise PipelineError(f"{flag} {path}: is {_kind(mode)}, not a regular file; give a file")
    if not empty_ok and path.stat().st_size == 0:
        raise PipelineError(f"{flag} {path}: the file is empty")
    return path


def check_output_file(path: str | Path, flag: str, inputs: list[str | Path] = (), what: str = "") -> None:
    """Refuse to write `path` (`what` of `flag`: "its held-out split") where something other
    than a regular file is (a folder, a device, a FIFO: the atomic rename would replace it), or
    where one of `inputs` is (the data it is made from would be lost). Checked before anything
    is read, so nothing is half-done."""
    path = Path(path).expanduser()
    named = f"{flag} {path}" if not what else f"{flag} ({what}) {path}"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise PipelineError(f"{named}: cannot be written ({e.strerror}); choose another {flag}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise PipelineError(f"{named}: is {_kind(mode)}; give the path of a new or regular file with {flag}")
    for source in inputs:
        if mode is not None and os.path.exists(source) and os.path.samefile(path, source):
            raise PipelineError(f"{named}: is the input {source}; writing it would lose the input. "
                                f"Choose another {flag}")
    if path.is_symlink():  # the rename would replace the link, not write where it points
        raise PipelineError(f"{named}: is a symbolic link, which lora-pipeline does not write through; "
                            f"give the path of a new or regular file with {flag}")


def check_output_folder(path: str | Path, flag: str) -> None:
    """Refuse a folder to write in that is a file or a device, or lies under one: mkdir would
    fail with "file exists", which reads as advice to remove the user's file."""
    path = Path(path).expanduser()
    for folder in [path, *path.parents]:
        if folder.exists():  # links followed: a link to a folder is a folder to write in
            if not folder.is_dir():
                what = "is" if folder == path else f"lies under {folder}, which is"
                raise PipelineError(f"{flag} {path}: {what} {_kind(folder.stat().st_mode)}, not a folder; "
                                    f"choose another {flag}")
            return


def write_atomic(path: Path, content: str | bytes) -> None:
    """Readers see the old file or the new one, never a partial write. Only a regular file is
    replaced: the rename would put a file in place of a device or a FIFO just the same."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise PipelineError(f"{path}: is {_kind(path.stat().st_mode)}, not a file lora-pipeline may replace")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode(0o666))
        with (os.fdopen(fd, "wb") if isinstance(content, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, target: Path) -> None:
    """Put a fully written folder in place of `target`: readers never see a partial one."""
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def write_json(path: Path, obj) -> None:
    """Valid JSON only: a NaN or infinity is an error here, not a file other tools reject."""
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def read_json(path: Path, default):
    """The JSON in `path`, or `default` when there is no such file (yet)."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else default


def slug(text: str) -> str:
    """`text` as a file name: runs of anything but letters, digits, dots and dashes become _."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text.strip("/"))


def held_out_path(data: str | Path) -> Path:
    """Where `prepare` puts the held-out split of the training file `data`."""
    return Path(data).with_name(Path(data).stem + ".val.jsonl")


def held_out_beside(data: str | Path) -> str | None:
    """The held-out split beside `data`, if there is one."""
    path = held_out_path(data)
    return str(path) if path.exists() else None


def folder_sha256(path: Path) -> str:
    """The hash of a folder's files, names and contents (hidden files left out)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{f.relative_to(path)}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tool_call_problem(call) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    return not (isinstance(function, dict) and call.get("type") == "function"
                and isinstance(function.get("name"), str) and function["name"].strip()
                and isinstance(function.get("arguments"), dict))


def problem(row) -> str | None:
    """Why a row of chat JSONL cannot be trained on, or None.

    The form is OpenAI's: `{"messages": [...], "tools": [...]}`, where an assistant message may
    carry `tool_calls` (`{"type": "function", "function": {"name", "arguments": {...}}}`, its
    text then may be empty), a `tool` message holds a call's result, and `tools` lists the
    functions offered (`{"type": "function", "function": {"name", ...}}`)."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        return "no messages"
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        return "malformed tools list"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return "missing or unknown role"
        if not isinstance(m.get("content"), str):
            return "non-string content"
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not calls or any(map(_tool_call_problem, calls)):
                return "malformed tool call"
        elif not m["content"].strip():
            return "empty content"
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "no assistant turn"
    if roles[-1] != "assistant":
        return "does not end with an assistant turn"
    if any(a == b != "tool" for a, b in zip(roles, roles[1:])):
        return "consecutive turns from the same role"
    for before, m in zip([None] + messages, messages):
        if m["role"] == "tool" and not (before and (before["role"] == "tool" or before.get("tool_calls"))):
            return "tool result without a tool call"
    try:
        json.dumps(row, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return "text is not valid Unicode (a lone surrogate)"
    except ValueError:
        return "NaN or Infinity in a value"
    except RecursionError:
        return "nested too deeply"
    return None


def read_chat_jsonl(path: Path, flag: str = "--data") -> list[dict]:
    """The rows (`{"messages": [...], "tools": [...]}`) of a prepared data file, given as
    `flag`. Strict: training data is expected to come out of `prepare`, so any bad line is an
    error that names it."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{flag} {path}: file not found; create it with `lora-pipeline prepare`")
    check_input_file(path, flag, empty_ok=True)  # an empty file: said below, as one holding no rows
    conversations = []
    with open(path, encoding="utf-8-sig", errors="strict") as f:  # -sig: a BOM is not a line's text
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise PipelineError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
            raise PipelineError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', type(e).__name__)}); "
                                "fix the line or rebuild the "
                                "file with `lora-pipeline prepare`") from None
        reason = problem(row)
        if reason:
            raise PipelineError(f"{path}:{n}: {reason}; fix the line or rebuild the file with "
                                "`lora-pipeline prepare`")
        conversations.append(row)
    if not conversations:
        raise PipelineError(f"{flag} {path}: the file holds no conversations")
    return conversations
