"""Data preparation: every shape in, every row accounted for, nothing half-written."""

import json

import pandas as pd
import pytest

from lora_pipeline.data import read_chat_jsonl
from lora_pipeline.errors import PipelineError
from lora_pipeline.prepare import prepare

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}


def good(i):
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"Arr! Answer {i}."}]}


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else ((r if isinstance(r, str) else json.dumps(r)) + "\n").encode())
    return path


def msgs(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# One bad row of each kind the report names.
BAD_ROWS = {
    "unparseable line": "{not json",
    "non-UTF-8 text": b'{"messages": "caf\xe9"}\n',
    "no known chat shape": {"text": "just text"},
    "missing or unknown role": msgs(("pirate", "Hi"), ("assistant", "x")),
    "non-string content": {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
    "empty content": msgs(("user", "  "), ("assistant", "x")),
    "no assistant turn": msgs(("system", "s"), ("user", "Hi")),
    "does not end with an assistant turn": msgs(("user", "Hi"), ("assistant", "x"), ("user", "more?")),
    "consecutive turns from the same role": msgs(("user", "Hi"), ("user", "Hi?"), ("assistant", "x")),
    "longer than 64 tokens": msgs(("user", "Hi"), ("assistant", "word " * 100)),
    "exact duplicate": good(0),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_bad_row_is_reported_with_its_reason_and_line(tmp_path, reason):
    src = write_jsonl(tmp_path / "in.jsonl", [good(0), good(1), BAD_ROWS[reason], good(2)])
    report = prepare(str(src), "train", tmp_path / "out.jsonl", max_length=64, on_overflow="drop")
    assert report["dropped"] == {reason: 1}
    assert report["dropped_examples"] == {reason: ["in.jsonl:3"]}
    assert report["kept"] == 3


def test_a_thousand_good_rows_and_ten_bad_kinds(tmp_path):
    bad = [BAD_ROWS[r] for r in sorted(BAD_ROWS) if r != "exact duplicate"]
    rows = [good(i) for i in range(1000)]
    for k, row in enumerate(bad):
        rows.insert(100 * k + 50, row)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    report = prepare(str(src), "train", out, max_length=64, on_overflow="drop", val_fraction=0)
    assert len(out.read_text().splitlines()) == 1000 == report["kept"]
    assert sorted(report["dropped"]) == sorted(r for r in BAD_ROWS if r != "exact duplicate")
    assert report["token_quantiles"]["max"] <= 64 and report["train_tokens_per_epoch"] > 0


def test_strict_stops_at_the_first_bad_row_and_writes_nothing(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [good(0), BAD_ROWS["empty content"], "{bad"])
    with pytest.raises(PipelineError, match=r"in.jsonl:2: empty content \(--strict"):
        prepare(str(src), "train", tmp_path / "out.jsonl", strict=True)
    assert not list(tmp_path.glob("out*"))


def test_validation_split_and_sampling_are_seeded(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [good(i) for i in range(100)])
    a = prepare(str(src), "train", tmp_path / "a.jsonl", max_examples=40, seed=1, val_fraction=0.25)
    prepare(str(src), "train", tmp_path / "b.jsonl", max_examples=40, seed=1, val_fraction=0.25)
    assert (a["train"], a["val"]) == (30, 10)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert (tmp_path / "a.val.jsonl").read_text() == (tmp_path / "b.val.jsonl").read_text()
    picked = {json.loads(line)["messages"][0]["content"] for name in ("a.jsonl", "a.val.jsonl")
              for line in (tmp_path / name).read_text().splitlines()}
    assert picked != {f"Question {i}?" for i in range(40)}  # a sample, not the first 40
    prepare(str(src), "train", tmp_path / "c.jsonl", max_examples=40, first=True, val_fraction=0)
    assert [json.loads(x)["messages"][0]["content"] for x in (tmp_path / "c.jsonl").read_text().splitlines()] \
        == [f"Question {i}?" for i in range(40)]


@pytest.mark.parametrize("row, expected", [
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr!"}]}, GOOD),
    ({"instruction": "Hi", "input": "", "output": "Arr!"}, GOOD),
    ({"instruction": "Hi", "input": "there", "output": "Arr!", "system": "S", "history": [["a", "b"]]},
     msgs(("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "Hi\n\nthere"), ("assistant", "Arr!"))),
    ({"prompt": "Hi", "completion": "Arr!"}, GOOD),
    ({"question": "Hi", "answer": "Arr!"}, GOOD),
    ({"prompt": "Hi", "prompt_id": "7", "messages": GOOD["messages"]}, GOOD),  # ultrachat's columns
])
def test_common_shapes_become_messages(tmp_path, row, expected):
    out = tmp_path / "out.jsonl"
    prepare(str(write_jsonl(tmp_path / "in.jsonl", [row])), "train", out, val_fraction=0)
    assert json.loads(out.read_text()) == expected


def test_column_mapping_and_format_override(tmp_path):
    pd.DataFrame({"q": ["Hi"], "a": ["Arr!"], "sys": ["S"]}).to_csv(tmp_path / "x.csv", index=False)
    out = tmp_path / "out.jsonl"
    prepare(str(tmp_path / "x.csv"), "train", out, fmt="columns", val_fraction=0,
            columns={"prompt": "q", "response": "a", "system": "sys"})
    assert json.loads(out.read_text()) == msgs(("system", "S"), ("user", "Hi"), ("assistant", "Arr!"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "completion": "Arr!"}, GOOD])
    report = prepare(str(src), "train", out, fmt="messages", val_fraction=0)
    assert report["dropped"] == {"no known chat shape": 1}  # --format messages: no guessing


def test_parquet_csv_and_folders(tmp_path):
    pd.DataFrame({"prompt": [f"Hi {i}" for i in range(5)], "completion": ["Arr!"] * 5}).to_parquet(tmp_path / "a.parquet")
    out = tmp_path / "out" / "data.jsonl"
    assert prepare(str(tmp_path / "a.parquet"), "train", out, max_examples=3, val_fraction=0)["kept"] == 3
    folder = tmp_path / "csvs"
    folder.mkdir()
    for name in ("x", "y"):
        pd.DataFrame({"question": [f"{name}1", f"{name}2"], "answer": ["Arr!"] * 2}).to_csv(folder / f"{name}.csv", index=False)
    assert prepare(str(folder), "train", out, val_fraction=0)["kept"] == 4


def test_a_folder_laid_out_as_a_hub_dataset_is_read_by_split(tmp_path):
    hub = tmp_path / "ultrachat"
    (hub / "data").mkdir(parents=True)
    rows = lambda tag, n: pd.DataFrame({  # noqa: E731
        "prompt": [f"{tag}{i}" for i in range(n)], "prompt_id": [str(i) for i in range(n)],
        "messages": [[{"role": "user", "content": f"{tag}{i}"}, {"role": "assistant", "content": "Arr!"}]
                     for i in range(n)]})
    rows("train", 6).to_parquet(hub / "data" / "train_sft-00000-of-00001.parquet")
    rows("test", 2).to_parquet(hub / "data" / "test_sft-00000-of-00001.parquet")
    report = prepare(str(hub), "train_sft", tmp_path / "out.jsonl", val_fraction=0)
    assert report["kept"] == 6 and report["dropped_examples"] == {}
    assert prepare(str(hub), "test_sft", tmp_path / "t.jsonl", val_fraction=0)["kept"] == 2


def test_unreadable_input_is_one_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(PipelineError, match="file not found"):
        prepare(str(tmp_path / "missing.jsonl"), "train", out)
    with pytest.raises(PipelineError, match="unknown file type"):
        prepare(str(write_jsonl(tmp_path / "data.txt", [GOOD])), "train", out)
    with pytest.raises(PipelineError, match="no rows to read"):
        prepare(str(write_jsonl(tmp_path / "empty.jsonl", [])), "train", out)
    with pytest.raises(PipelineError, match="none of 1 rows"):
        prepare(str(write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])), "train", out)
    assert list(tmp_path.glob("out*")) == []


def test_read_chat_jsonl_names_the_bad_line(tmp_path):
    assert read_chat_jsonl(write_jsonl(tmp_path / "ok.jsonl", [GOOD, "", GOOD])) == [GOOD] * 2
    with pytest.raises(PipelineError, match=r"bad.jsonl:2: not valid JSON"):
        read_chat_jsonl(write_jsonl(tmp_path / "bad.jsonl", [GOOD, "{oops"]))
    with pytest.raises(PipelineError, match=r"worse.jsonl:1: no messages"):
        read_chat_jsonl(write_jsonl(tmp_path / "worse.jsonl", [{"text": "x"}]))
    with pytest.raises(PipelineError, match=r"deep.jsonl:1: not valid JSON \(RecursionError\)"):
        read_chat_jsonl(write_jsonl(tmp_path / "deep.jsonl", ["[" * 100000]))
    with pytest.raises(PipelineError, match=r"lone.jsonl:1: text is not valid Unicode"):
        read_chat_jsonl(write_jsonl(tmp_path / "lone.jsonl", ['{"messages": [{"role": "user", "content": "\\ud800"}, '
                                                               '{"role": "assistant", "content": "x"}]}']))
    with pytest.raises(PipelineError, match="file not found"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
    with pytest.raises(PipelineError, match="not UTF-8"):
        read_chat_jsonl(tmp_path / "latin1.jsonl")


def test_token_counts_are_the_training_renderings(tmp_path):
    """prepare's statistics and drops come from the same rendering that training uses."""
    from conftest import SAMPLE
    from lora_pipeline.models import SMOLLM2, load_tokenizer
    from lora_pipeline.render import render_conversations, renderer_for

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:60]] + [
        msgs(("system", "Be brief."), ("user", "Hi  there\n"), ("assistant", " Arr!"), ("user", "¿Qué?"),
             ("assistant", "Ünïcödé 🦜 and\ttabs")),
        msgs(("user", "word " * 300), ("assistant", "Arr!")),  # loses its answer to the cut
        msgs(("user", "Hi"), ("assistant", "word " * 300))]  # cut, keeps part of its answer
    out = tmp_path / "out.jsonl"
    report = prepare(str(write_jsonl(tmp_path / "in.jsonl", rows)), "train", out, max_length=128, val_fraction=0)
    assert report["dropped"] == {"no assistant tokens within the length limit": 1}
    assert report["dropped_examples"] == {"no assistant tokens within the length limit": ["in.jsonl:62"]}
    data, rendered = render_conversations(read_chat_jsonl(out), renderer_for(SMOLLM2, load_tokenizer(SMOLLM2)), 128)
    assert (report["kept"], report["truncated"], report["assistant_tokens"]) == (
        rendered.kept, rendered.truncated, rendered.trained_tokens)
    assert report["train_tokens_per_epoch"] == rendered.tokens + rendered.kept  # datums drop one token


def test_held_out_conversations_become_test_prompts(tmp_path):
    from lora_pipeline.evaluate import load_prompts

    convo = msgs(("system", "S"), ("user", "Hi"), ("assistant", "Arr!"), ("user", "More?"), ("assistant", "Aye."))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    src = write_jsonl(tmp_path / "val.jsonl", [convo, GOOD, {**GOOD, "tools": tools}])
    assert load_prompts(str(src)) == [{"messages": convo["messages"][:-1]}, {"messages": GOOD["messages"][:1]},
                                      {"messages": GOOD["messages"][:1], "tools": tools}]  # offered, as in training
    assert len(load_prompts(str(write_jsonl(tmp_path / "forty.jsonl", [good(i) for i in range(40)])))) == 40  # whole


# -- tool calls ---------------------------------------------------------------------------------
def test_glaive_toolcall_rows_are_kept_with_their_tool_calls(tmp_path):
    from glaive_toolcall import rows

    from lora_pipeline.prepare import summary

    src = tmp_path / "glaive_toolcall_en_demo.json"
    src.write_text(json.dumps(rows(), indent=2))  # a JSON array, as LLaMA-Factory ships it
    out = tmp_path / "out.jsonl"
    report = prepare(str(src), "train", out, max_length=1024, val_fraction=0)
    assert report["rows_read"] == 300 and report["kept"] >= 270
    assert report["dropped"] == {"exact duplicate": 4}
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    with_calls = [r for r in kept if any(m.get("tool_calls") for m in r["messages"])]
    assert report["tool_call_rows"] == len(with_calls) >= 200
    assert f"{len(with_calls)} with tool calls" in summary(report)
    first = with_calls[0]
    assert [m["role"] for m in first["messages"]][:4] in (["user", "assistant", "tool", "assistant"],
                                                         ["user", "assistant", "user", "assistant"])
    call = next(m for m in first["messages"] if m.get("tool_calls"))
    assert call["content"] == "" and isinstance(call["tool_calls"][0]["function"]["arguments"], dict)
    assert all(t["type"] == "function" and "parameters" in t["function"] for t in first["tools"])


def test_openai_tool_calls_and_tool_messages_are_kept(tmp_path):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    row = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "assistant", "content": "18 °C in Paris."}], "tools": [weather]}
    out = tmp_path / "out.jsonl"
    report = prepare(str(write_jsonl(tmp_path / "in.jsonl", [row, GOOD])), "train", out, max_length=256, val_fraction=0)
    assert report["kept"] == 2 and report["tool_call_rows"] == 1
    assert json.loads(out.read_text().splitlines()[0]) == {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C"},
        {"role": "assistant", "content": "18 °C in Paris."}], "tools": [weather]}
    assert read_chat_jsonl(out)[0]["tools"] == [weather]


def sharegpt(*turns, **extra):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


@pytest.mark.parametrize("row, reason", [
    (sharegpt(("human", "Hi"), ("function_call", "not json"), ("observation", "x"), ("gpt", "ok")), "malformed tool call"),
    (sharegpt(("human", "Hi"), ("function_call", '{"name": "f", "arguments": [1]}'), ("gpt", "ok")), "malformed tool call"),
    (sharegpt(("human", "Hi"), ("observation", "{}"), ("gpt", "ok")), "tool result without a tool call"),
    (sharegpt(("human", "Hi"), ("gpt", "ok"), tools="{not a list"), "malformed tools list"),
    (sharegpt(("human", "Hi"), ("gpt", "ok"), tools='[{"description": "no name"}]'), "malformed tools list"),
])
def test_malformed_tool_rows_are_dropped_with_the_reason(tmp_path, row, reason):
    report = prepare(str(write_jsonl(tmp_path / "in.jsonl", [GOOD, row])), "train", tmp_path / "o.jsonl", val_fraction=0)
    assert report["dropped"] == {reason: 1} and report["dropped_examples"] == {reason: ["in.jsonl:2"]}


# -- #13: one bad row never fails the file ------------------------------------------------------
LONE = "\ud800"


@pytest.mark.parametrize("row, reason", [
    ({"instruction": ["a", "list"], "output": "Arr!"}, "non-string content"),
    ({"instruction": None, "output": "Arr!"}, "non-string content"),
    ({"instruction": 42, "output": "Arr!"}, "non-string content"),
    ({"instruction": "Hi", "input": 7, "output": "Arr!"}, "non-string content"),
    ({"instruction": "Hi", "output": "Arr!", "history": [["a", None]]}, "non-string content"),
    ({"instruction": "Hi", "output": "Arr!", "history": "nope"}, "malformed history"),
    ({"instruction": "Hi", "output": "Arr!", "system": ["S"]}, "non-string content"),
    ({"conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "Arr!"}]}, "missing or unknown role"),
    ({"conversations": [{"from": {"x": 1}, "value": "Hi"}, {"from": "gpt", "value": "Arr!"}]}, "missing or unknown role"),
    ({"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "Arr!"}]}, "non-string content"),
    ({"conversations": ["Hi", "Arr!"]}, "missing or unknown role"),
    ({"messages": [{"role": 1, "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}, "missing or unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                   {"role": "assistant", "content": "Arr!"}]}, "non-string content"),
    ({"prompt": 3, "completion": "Arr!"}, "non-string content"),
    ({"question": "Hi", "answer": None}, "non-string content"),
    (msgs(("user", "Hi" + LONE), ("assistant", "Arr!")), "text is not valid Unicode (a lone surrogate)"),
    ({"instruction": "Hi", "output": LONE}, "text is not valid Unicode (a lone surrogate)"),
    (sharegpt(("human", "Hi"), ("gpt", "Arr!"), system=LONE), "text is not valid Unicode (a lone surrogate)"),
    (sharegpt(("human", "Hi"), ("function_call", json.dumps({"name": "f", "arguments": {"k": LONE}})),
              ("observation", "{}"), ("gpt", "ok")), "text is not valid Unicode (a lone surrogate)"),
    ([1, 2, 3], "no known chat shape"),
    ("just a string", "no known chat shape"),
])
def test_a_bad_row_of_any_type_is_dropped_not_fatal(tmp_path, row, reason):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([json.dumps(GOOD), json.dumps(row), json.dumps(good(1))]) + "\n")
    out = tmp_path / "out.jsonl"
    report = prepare(str(src), "train", out, max_length=64, val_fraction=0)
    assert report["dropped"] == {reason: 1} and report["dropped_examples"] == {reason: ["in.jsonl:2"]}
    assert len(out.read_text().splitlines()) == report["kept"] == 2


def test_a_huge_line_is_dropped_unread_in_bounded_memory(tmp_path):
    import time
    import tracemalloc

    from lora_pipeline.prepare import MAX_ROW_BYTES

    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        f.write(json.dumps(GOOD) + "\n")
        huge = msgs(("user", "word " * (10 * MAX_ROW_BYTES // 5)), ("assistant", "Arr!"))  # ~40 MB
        f.write(json.dumps(huge) + "\n" + json.dumps(good(1)) + "\n")
    del huge
    import datasets  # noqa: F401  (prepare imports these: their modules are not the row's memory)

    import lora_pipeline.render  # noqa: F401

    started = time.monotonic()
    tracemalloc.start()
    report = prepare(str(src), "train", tmp_path / "out.jsonl", val_fraction=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report["dropped_examples"] == {"row larger than 4 MiB": ["in.jsonl:2"]}
    assert report["kept"] == 2
    assert peak < 3 * MAX_ROW_BYTES and time.monotonic() - started < 30


def test_a_json_array_file_is_read_row_by_row(tmp_path):
    src = tmp_path / "rows.json"
    src.write_text(json.dumps([GOOD, {"instruction": ["a list"], "output": "x"}, good(1), 7]))
    report = prepare(str(src), "train", tmp_path / "out.jsonl", val_fraction=0)
    assert report["kept"] == 2
    assert report["dropped_examples"] == {"non-string content": ["rows.json:row 2"], "no known chat shape": ["rows.json:row 4"]}
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n{cut\n")  # JSON Lines in a .json file
    report = prepare(str(tmp_path / "lines.json"), "train", tmp_path / "out.jsonl", val_fraction=0)
    assert report["dropped_examples"] == {"unparseable line": ["lines.json:2"]}
    (tmp_path / "cut.json").write_text(json.dumps([GOOD, GOOD])[:-5])
    with pytest.raises(PipelineError, match=r"cut.json: unparseable JSON array; fix the file or write it as JSON Lines"):
        prepare(str(tmp_path / "cut.json"), "train", tmp_path / "out.jsonl")


# -- inputs that are not what they seem, outputs that would lose something ---------------------
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path):
    rows = [good(0), BAD_ROWS["no known chat shape"], good(1), good(2)]
    src = write_jsonl(tmp_path / "mine.jsonl", rows)
    before = src.read_bytes()
    val = write_jsonl(tmp_path / "mine.val.jsonl", rows)  # the held-out split of --output mine.jsonl
    (tmp_path / "folder").mkdir()
    inside = write_jsonl(tmp_path / "folder" / "part.jsonl", rows)
    (tmp_path / "link.jsonl").symlink_to(src)
    for dataset, output in [(src, src), (src, tmp_path / "link.jsonl"), (val, src),
                            (tmp_path / "folder", inside)]:
        with pytest.raises(PipelineError, match=r"--output .*is the input .*writing it would lose the input"):
            prepare(str(dataset), "train", output)
    assert src.read_bytes() == before == val.read_bytes() == inside.read_bytes()


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "link to a device"])
def test_an_output_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    import os
    import stat

    src = write_jsonl(tmp_path / "in.jsonl", [good(0), good(1)])
    out = tmp_path / "out.jsonl"
    if kind == "folder":
        out.mkdir()
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "device":  # a copy of /dev/null: the rename would have replaced it by a file
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        out.symlink_to("/dev/null")
    mode = os.lstat(out).st_mode
    with pytest.raises(PipelineError, match=r"--output .*out.jsonl: is (a folder|a device|a named pipe)"):
        prepare(str(src), "train", out, val_fraction=0)
    assert os.lstat(out).st_mode == mode and sorted(tmp_path.iterdir()) == sorted([src, out])


@pytest.mark.parametrize("kind", ["device", "fifo", "link to a device", "fifo in a folder"])
def test_an_input_that_is_not_a_regular_file_is_refused_before_it_is_read(tmp_path, kind):
    """/dev/zero would be read (and hashed, by the cache) forever; a FIFO would block the open."""
    import os

    from lora_pipeline.settings import PrepareSettings

    dataset = {"device": "/dev/zero", "fifo": tmp_path / "pipe.jsonl", "link to a device": tmp_path / "zero.jsonl",
               "fifo in a folder": tmp_path / "folder"}[kind]
    if kind == "fifo":
        os.mkfifo(dataset)
    elif kind == "link to a device":
        dataset.symlink_to("/dev/zero")
    elif kind == "fifo in a folder":
        dataset.mkdir()
        write_jsonl(dataset / "a.jsonl", [GOOD])
        os.mkfifo(dataset / "b.jsonl")
    settings = PrepareSettings(dataset=str(dataset), output=str(tmp_path / "out.jsonl"))
    with pytest.raises(PipelineError, match=r"--dataset .*: is (a device|a named pipe \(FIFO\)), not a regular file"):
        settings.check()
    with pytest.raises(PipelineError, match="not a regular file"):
        prepare(str(dataset), "train", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    from lora_pipeline.data import BOM

    src = tmp_path / "bom.jsonl"
    src.write_bytes(BOM + b"".join((json.dumps(good(i)) + "\n").encode() for i in range(3)))
    report = prepare(str(src), "train", tmp_path / "out.jsonl", val_fraction=0)
    assert report["kept"] == 3 and report["dropped"] == {}
    array = tmp_path / "bom.json"
    array.write_bytes(BOM + json.dumps([good(i) for i in range(10)], indent=1).encode())
    report = prepare(str(array), "train", tmp_path / "out.jsonl", val_fraction=0)
    assert report["rows_read"] == report["kept"] == 10
    assert len(read_chat_jsonl(src)) == 3  # training reads a prepared file saved with a BOM alike
    from lora_pipeline.evaluate import load_prompts

    prompts = tmp_path / "prompts.json"
    prompts.write_bytes(BOM + json.dumps(["Hello!", "Ahoy?"]).encode())
    assert [p["messages"][0]["content"] for p in load_prompts(str(prompts))] == ["Hello!", "Ahoy?"]


def test_a_hub_dataset_with_the_hub_out_of_reach_is_said_at_once(tmp_path, monkeypatch):
    """Before: a minute of the hub client's retries before the error."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(PipelineError, match="--dataset someone/some-dataset: no such local file or folder, and the "
                                            "Hugging Face hub, where a dataset id is read from, cannot be reached"):
        prepare("someone/some-dataset", "train", tmp_path / "out.jsonl")
    assert time.monotonic() - started < 5 and not (tmp_path / "out.jsonl").exists()
