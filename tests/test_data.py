import json

import pandas as pd
import pytest

from lora_pipeline.data import prepare, read_chat_jsonl
from lora_pipeline.errors import PipelineError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prepare_keeps_good_rows_and_reports_the_rest_by_reason(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        GOOD,
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "pirate", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
        {"text": "no chat here"},
        GOOD,
    ])
    out = tmp_path / "out.jsonl"
    report = prepare(str(src), "train", out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [GOOD, GOOD]
    assert report["rows_read"] == 6 and report["kept"] == 2
    assert report["dropped_examples_rows"] == {
        "does not end with an assistant turn": [2], "missing or unknown role": [3],
        "empty content": [4], "no known chat shape": [5]}
    assert json.loads((tmp_path / "out.jsonl.report.json").read_text()) == report


@pytest.mark.parametrize("row", [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr!"}]},
    {"instruction": "Hi", "input": "", "output": "Arr!"},
    {"prompt": "Hi", "completion": "Arr!"},
    {"question": "Hi", "answer": "Arr!"},
])
def test_common_shapes_become_messages(tmp_path, row):
    out = tmp_path / "out.jsonl"
    prepare(str(write_jsonl(tmp_path / "in.jsonl", [row])), "train", out)
    assert json.loads(out.read_text()) == GOOD


def test_parquet_csv_folders_and_max_examples(tmp_path):
    pd.DataFrame({"prompt": ["Hi"] * 5, "completion": ["Arr!"] * 5}).to_parquet(tmp_path / "a.parquet")
    out = tmp_path / "out" / "data.jsonl"
    assert prepare(str(tmp_path / "a.parquet"), "train", out, max_examples=3)["kept"] == 3
    folder = tmp_path / "csvs"
    folder.mkdir()
    for name in ("x.csv", "y.csv"):
        pd.DataFrame({"question": ["Hi", "Hi"], "answer": ["Arr!", "Arr!"]}).to_csv(folder / name, index=False)
    assert prepare(str(folder), "train", out)["kept"] == 4


def test_unreadable_input_is_one_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(PipelineError, match="file not found"):
        prepare(str(tmp_path / "missing.jsonl"), "train", out)
    with pytest.raises(PipelineError, match="unknown file type"):
        prepare(str(write_jsonl(tmp_path / "data.txt", [GOOD])), "train", out)
    with pytest.raises(PipelineError, match="none of 1 rows"):
        prepare(str(write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])), "train", out)
    assert list(tmp_path.glob("out*")) == []


def test_read_chat_jsonl_names_the_bad_line(tmp_path):
    assert read_chat_jsonl(write_jsonl(tmp_path / "ok.jsonl", [GOOD, "", GOOD])) == [GOOD["messages"]] * 2
    with pytest.raises(PipelineError, match=r"bad.jsonl:2: not valid JSON"):
        read_chat_jsonl(write_jsonl(tmp_path / "bad.jsonl", [GOOD, "{oops"]))
    with pytest.raises(PipelineError, match=r"worse.jsonl:1: no \"messages\" list"):
        read_chat_jsonl(write_jsonl(tmp_path / "worse.jsonl", [{"text": "x"}]))
    with pytest.raises(PipelineError, match="file not found"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
    with pytest.raises(PipelineError, match="not UTF-8"):
        read_chat_jsonl(tmp_path / "latin1.jsonl")
