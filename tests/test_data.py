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


def test_sharegpt_tool_turns_are_reported(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"},
                             {"from": "gpt", "value": "Arr!"}]}
    src = write_jsonl(tmp_path / "in.jsonl", [row, GOOD])
    assert prepare(str(src), "train", tmp_path / "o.jsonl", val_fraction=0)["dropped"] == {"missing or unknown role": 1}


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


def test_batched_token_counts_equal_the_renderers(tmp_path):
    from tinker_cookbook.renderers import TrainOnWhat

    from conftest import SAMPLE
    from lora_pipeline.models import SMOLLM2, load_tokenizer
    from lora_pipeline.prepare import TokenCounter
    from lora_pipeline.render import renderer_for

    tokenizer = load_tokenizer(SMOLLM2)
    renderer = renderer_for(SMOLLM2, tokenizer)
    conversations = read_chat_jsonl(SAMPLE)[:60] + [
        msgs(("system", "Be brief."), ("user", "Hi  there\n"), ("assistant", " Arr!"), ("user", "¿Qué?"),
             ("assistant", "Ünïcödé 🦜 and\ttabs"))["messages"]]
    expected = []
    for c in conversations:
        model_input, weights = renderer.build_supervised_example(c, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
        expected.append((model_input.length, int(weights.sum())))
    assert TokenCounter(renderer, tokenizer).count(conversations, chunk=7) == expected


def test_held_out_conversations_become_test_prompts(tmp_path):
    from lora_pipeline.evaluate import load_prompts

    convo = msgs(("system", "S"), ("user", "Hi"), ("assistant", "Arr!"), ("user", "More?"), ("assistant", "Aye."))
    src = write_jsonl(tmp_path / "val.jsonl", [convo, GOOD])
    assert load_prompts(str(src)) == [convo["messages"][:-1], GOOD["messages"][:1]]
    assert load_prompts(str(src), limit=1) == [convo["messages"][:-1]]
