"""Fuzzing `prepare`: files of random rows (every known shape, mutated with wrong types, odd
Unicode, control tokens, deep nesting) and random lines (bytes, cut JSON, bad UTF-8).

Whatever the other rows, a file with one good row is never refused: `prepare` returns a report
in which every row is accounted for (rows read = kept + dropped, by reason), and everything it
keeps is accepted by training as it is (`read_chat_jsonl`; with a token limit, rendering drops
nothing more). The suite runs a few seeded cases (tests/test_fuzz.py); `make fuzz` runs this
file for minutes and prints how many cases it tried.
"""

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_pipeline.data import read_chat_jsonl
from lora_pipeline.prepare import prepare

STRINGS = ["Hi", "", "   ", "\n\nleading", "<|im_end|>", "<|im_start|>user", "\ud800", "\udfff lone", "🦜 emoji",
           "日本語", "\x00nul", "a\u2028b", "{% if %}", "{{ x }}", "null", "[]", "{}", "\\", '"quoted"',
           "function_call", "observation", "human", "gpt", "assistant", "tool", "system", "user"]
ROLES_SHAREGPT = ["human", "gpt", "function_call", "observation", "system", "tool", "bot", "pirate"]


def text(r: random.Random) -> str:
    if r.random() < 0.5:
        return r.choice(STRINGS)
    alphabet = [chr(r.randint(0x20, 0x7e)) for _ in range(8)] + [chr(r.randint(0xa0, 0x2fff))] + ["\n", " "]
    return "".join(r.choice(alphabet) for _ in range(r.randint(0, 40)))


def value(r: random.Random, depth: int = 0):
    kinds = [lambda: None, lambda: True, lambda: r.randint(-10**6, 10**6), lambda: r.random() * 1e6,
             lambda: float(r.choice(["nan", "inf"])), lambda: 10**30, lambda: text(r), lambda: text(r),
             lambda: [value(r, depth + 1) for _ in range(r.randint(0, 3))],
             lambda: {text(r): value(r, depth + 1) for _ in range(r.randint(0, 3))}]
    return r.choice(kinds if depth < 3 else kinds[:-2])()


def call(r: random.Random) -> dict:
    return {"name": r.choice(["get_weather", "search", text(r)]), "arguments": {"city": text(r), "n": r.randint(0, 9)}}


def good_row(r: random.Random) -> dict:
    """A row of a known shape, usually valid."""
    shape = r.randint(0, 6)
    if shape == 0:
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": text(r) or "x"} for i in range(r.choice([2, 4]))]
        return {"messages": ([{"role": "system", "content": "Be brief."}] if r.random() < 0.3 else []) + turns}
    if shape == 1:
        return {"conversations": [{"from": "human", "value": text(r) or "q"},
                                  {"from": "function_call", "value": json.dumps(call(r))},
                                  {"from": "observation", "value": json.dumps({"result": text(r)})},
                                  {"from": "gpt", "value": text(r) or "a"}],
                "tools": json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}])}
    if shape == 2:
        return {"conversations": [{"from": "human", "value": text(r) or "q"}, {"from": "gpt", "value": text(r) or "a"}]}
    if shape == 3:
        return {"instruction": text(r) or "i", "input": r.choice(["", text(r)]), "output": text(r) or "o",
                "system": r.choice(["", "S"]), "history": r.choice([[], [["a", "b"]]])}
    if shape == 4:
        return {"prompt": text(r) or "p", "completion": text(r) or "c"}
    if shape == 5:
        return {"question": text(r) or "q", "answer": text(r) or "a"}
    c = call(r)
    return {"messages": [{"role": "user", "content": text(r) or "q"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "1", "type": "function",
                              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}]},
                         {"role": "tool", "content": text(r) or "r"}, {"role": "assistant", "content": text(r) or "a"}],
            "tools": [{"type": "function", "function": {"name": c["name"]}}]}


def mutate(r: random.Random, node):
    """Replace, delete or add something at a random place in the row."""
    if isinstance(node, dict) and node and r.random() < 0.7:
        key = r.choice(list(node))
        action = r.random()
        if action < 0.5 and isinstance(node[key], (dict, list)) and node[key]:
            mutate(r, node[key])
        elif action < 0.8:
            node[key] = value(r)
        elif action < 0.9:
            del node[key]
        else:
            node[text(r)] = value(r)
    elif isinstance(node, list) and node:
        i = r.randrange(len(node))
        if isinstance(node[i], (dict, list)) and r.random() < 0.6:
            mutate(r, node[i])
        else:
            node[i] = value(r)


def line(r: random.Random) -> bytes:
    kind = r.random()
    if kind < 0.55:
        row = good_row(r)
        for _ in range(r.choice([0, 0, 1, 1, 2, 3])):
            mutate(r, row)
        return json.dumps(row).encode()  # ASCII: lone surrogates travel as \ud800 escapes
    if kind < 0.65:
        return json.dumps(value(r)).encode()
    if kind < 0.72:
        return json.dumps(good_row(r)).encode()[: r.randint(0, 60)]
    if kind < 0.79:
        return bytes(r.randrange(256) for _ in range(r.randint(1, 60)))
    if kind < 0.84:
        return json.dumps(good_row(r), ensure_ascii=False).encode("utf-8", "surrogatepass").replace(b"Hi", b"H\xe9")
    if kind < 0.89:
        return b"[" * r.choice([10, 5000, 200000])
    if kind < 0.94:
        return b"   "
    return json.dumps(good_row(r), ensure_ascii=False).encode("utf-8", "surrogatepass")


ANCHOR = {"messages": [{"role": "user", "content": "fuzz anchor"}, {"role": "assistant", "content": "kept"}]}


def case(r: random.Random, folder: Path, renderer=None) -> dict:
    """One random file through prepare; raises AssertionError when an invariant breaks."""
    lines = [line(r) for _ in range(r.randint(1, 30))]
    lines.insert(r.randint(0, len(lines)), json.dumps(ANCHOR).encode())
    src, out = folder / "in.jsonl", folder / "out.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    rows_in = sum(1 for raw in src.read_bytes().split(b"\n") if raw.strip())
    max_length = r.choice([None, 64, 512]) if renderer else None
    options = dict(val_fraction=r.choice([0, 0.2]), max_length=max_length, on_overflow=r.choice(["truncate", "drop"]),
                   seed=r.randint(0, 9))
    report = prepare(str(src), "train", out, **options)  # the anchor row is usable: never refused
    assert report["rows_read"] == rows_in, (report, rows_in)
    assert report["rows_read"] == report["kept"] + sum(report["dropped"].values()), report
    assert report["kept"] == report["train"] + report["val"]
    kept = read_chat_jsonl(out) + (read_chat_jsonl(Path(report["validation"])) if report["val"] else [])
    assert len(kept) == report["kept"]
    if max_length:
        from lora_pipeline.render import render_conversations

        _, rendered = render_conversations(kept, renderer, max_length, options["on_overflow"])
        assert not rendered.dropped and rendered.trained_tokens == report["assistant_tokens"], (rendered, report)
    return {"rows": rows_in, "kept": report["kept"], **Counter(report["dropped"])}


# What a --dataset and an --output can be besides a file: the kinds that hung (a device, a FIFO,
# a link to one) or lost data (the output on the input, on a device, through a link).
INPUT_KINDS = ["file", "held-out file", "fifo", "link to /dev/zero", "link to the file", "folder",
               "folder with a fifo", "/dev/null"]
OUTPUT_KINDS = ["new", "existing file", "the input", "the input's held-out split", "link to the input",
                "folder", "fifo", "link to /dev/null", "inside the input folder", "link to a folder"]


PATH_CASES = "path cases "  # the totals' keys of path_case's outcomes, apart from rows' reasons


def path_case(r: random.Random, folder: Path) -> tuple[str, str, str]:
    """One random --dataset and --output of those kinds through the CLI's check and prepare:
    either prepare writes regular files and the input is intact, or it refuses at once with one
    line and nothing changed. Never a hang: a FIFO opened or a device read is a failure here.
    Returns "written" or "refused"."""
    import os
    import stat
    import threading

    from lora_pipeline.errors import PipelineError
    from lora_pipeline.settings import PrepareSettings

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    rows = b"".join(json.dumps(row).encode() + b"\n" for row in [ANCHOR, good_row(r), good_row(r), good_row(r)])
    kind_in, kind_out = r.choice(INPUT_KINDS), r.choice(OUTPUT_KINDS)
    data = folder / ("mine.val.jsonl" if kind_in == "held-out file" else "mine.jsonl")
    data.write_bytes(rows)
    dataset = {"fifo": folder / "pipe.jsonl", "link to /dev/zero": folder / "zero.jsonl",
               "link to the file": folder / "link.jsonl", "folder": folder / "in",
               "folder with a fifo": folder / "in", "/dev/null": Path("/dev/null")}.get(kind_in, data)
    if kind_in == "fifo":
        os.mkfifo(dataset)
    elif kind_in == "link to /dev/zero":
        dataset.symlink_to("/dev/zero")
    elif kind_in == "link to the file":
        dataset.symlink_to(data)
    elif kind_in.startswith("folder"):
        dataset.mkdir()
        (dataset / "part.jsonl").write_bytes(rows)
        if kind_in == "folder with a fifo":
            os.mkfifo(dataset / "more.jsonl")
    output = {"new": folder / "out.jsonl", "existing file": folder / "old.jsonl", "the input": dataset,
              "the input's held-out split": folder / "mine.jsonl", "link to the input": folder / "out-link.jsonl",
              "folder": folder / "out-folder", "fifo": folder / "out-pipe.jsonl", "link to /dev/null": folder / "null",
              "inside the input folder": (dataset if dataset.is_dir() else folder) / "part.jsonl",
              "link to a folder": folder / "dir-link"}[kind_out]
    if kind_out == "existing file":
        output.write_text("an earlier output\n")
    elif kind_out == "link to the input":
        output.symlink_to(dataset)
    elif kind_out == "folder":
        output.mkdir()
    elif kind_out == "fifo":
        os.mkfifo(output)
    elif kind_out == "link to /dev/null":
        output.symlink_to("/dev/null")
    elif kind_out == "link to a folder":
        output.symlink_to(folder)

    def state() -> dict:
        return {str(p): (os.lstat(p).st_mode, p.read_bytes() if p.is_file() and not p.is_symlink() else None)
                for p in [*folder.rglob("*"), Path("/dev/null")]}
    before, outcome = state(), {}

    def attempt() -> None:
        try:
            PrepareSettings(dataset=str(dataset), output=str(output), max_length=None).check()
            outcome["report"] = prepare(str(dataset), "train", output, val_fraction=0.3)
        except PipelineError as e:
            outcome["refused"] = str(e)
        except BaseException as e:
            outcome["error"] = e
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), f"prepare hung on --dataset {kind_in} --output {kind_out}"
    assert "error" not in outcome, (kind_in, kind_out, outcome)
    inputs = [data] + ([dataset / "part.jsonl"] if dataset.is_dir() else [])
    assert all(f.read_bytes() == rows for f in inputs if f != output or "refused" in outcome), (kind_in, kind_out)
    if "refused" in outcome:
        assert "\n" not in outcome["refused"] and state() == before, (kind_in, kind_out, outcome["refused"])
        return "refused", kind_in, kind_out
    report = outcome["report"]
    for written in [Path(report["output"]), Path(report["output"] + ".report.json")] + \
            ([Path(report["validation"])] if report["validation"] else []):
        assert stat.S_ISREG(os.lstat(written).st_mode), (kind_in, kind_out, written)
    for path, (mode, _) in before.items():  # nothing that was not a regular file was replaced
        if not stat.S_ISREG(mode):
            assert os.lstat(path).st_mode == mode, (kind_in, kind_out, path)
    return "written", kind_in, kind_out


def fuzz(seed: int, cases: int | None = None, seconds: float | None = None, with_tokens: bool = True) -> Counter:
    """Run cases until `cases` or `seconds` is reached; the totals, "cases" among them."""
    renderer = None
    if with_tokens:
        from lora_pipeline.models import SMOLLM2, load_tokenizer
        from lora_pipeline.render import renderer_for

        renderer = renderer_for(SMOLLM2, load_tokenizer(SMOLLM2))
    r, totals, started = random.Random(seed), Counter(), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        while (cases is None or totals["cases"] < cases) and (seconds is None or time.monotonic() - started < seconds):
            try:
                totals.update(case(r, Path(tmp), renderer))
                if totals["cases"] % 4 == 0:  # and now and then, paths that are not plain files
                    totals[PATH_CASES + path_case(r, Path(tmp) / "paths")[0]] += 1
            except BaseException:
                kept = Path(tempfile.gettempdir()) / "lora-pipeline-fuzz-failure.jsonl"
                if (Path(tmp) / "in.jsonl").exists():
                    shutil.copy(Path(tmp) / "in.jsonl", kept)
                print(f"failing case: seed {seed}, case {totals['cases']}; its input: {kept}", file=sys.stderr)
                raise
            totals["cases"] += 1
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    a = parser.parse_args()
    totals = fuzz(a.seed, seconds=a.seconds)
    reasons = {k: v for k, v in totals.items() if k not in ("cases", "rows", "kept") and not k.startswith(PATH_CASES)}
    print(f"fuzz (seed {a.seed}): {totals['cases']} cases, {totals['rows']} rows in {a.seconds:.0f} s; "
          f"{totals['kept']} kept, {sum(reasons.values())} dropped; no traceback, every row accounted for; "
          f"{totals[PATH_CASES + 'written']} odd paths written to and {totals[PATH_CASES + 'refused']} refused, "
          "none hung or lost a byte")
    for reason, n in sorted(reasons.items(), key=lambda x: -x[1]):
        print(f"  {n:6d}  {reason}")


if __name__ == "__main__":
    main()
