"""The report of a real (small) run: report.html's plot, tables and answers, and the
overfitting signals it computes."""

import base64
import html
import json
import re

import pytest

from lora_pipeline.evaluate import compare
from lora_pipeline.report import (checkpoint_rows, loss_figure, md_cell, md_quote, md_text, overfitting, shares_span,
                                  starting_point, write_report)
from lora_pipeline.run_folder import CheckpointRecord, RunSummary
from lora_pipeline.settings import SampleSettings
from lora_pipeline.train import TrainingRun, train
from training import training_settings


def test_shares_span_finds_a_50_character_run_wherever_it_starts():
    corpus = "Example one: " + "x" * 10 + "the quick brown fox jumps over the lazy dog while the cat sleeps"
    copied = corpus[17:67]  # 50 characters, starting at no particular offset
    assert shares_span("Preamble, " + copied + ", and more.", corpus)
    assert not shares_span("Preamble, " + copied[:49] + "!", corpus)
    # Runs that only meet across two training examples do not count.
    assert not shares_span("a" * 30 + "b" * 30, "a" * 30 + "\n\0\n" + "b" * 30)
    assert shares_span("a" * 30 + "b" * 30, "zz" + "a" * 30 + "b" * 30 + "zz")


def test_checkpoint_rows_put_training_and_held_out_loss_side_by_side():
    log = [{"step": s, "loss": 4.0 - s} for s in range(1, 5)]
    summary = RunSummary(
        run_dir="r", final_lora_weights="r/final_lora_weights", backend="local", base_model="m", steps=4,
        first_loss=3.0, last_loss=0.0, tokens=100, val_loss_base=4.0, val_loss_final=3.2, time_s=1.0,
        checkpoints=[CheckpointRecord("checkpoint_step_2", 2, state_path="a"),
                     CheckpointRecord("final_lora_weights", 4, sampler_path="b"),
                     CheckpointRecord("training_state", 4, state_path="c")],
        best={"name": "checkpoint_step_2"})
    val_log = [{"step": 0, "val_loss": 4.0, "train_loss": 4.1}, {"step": 2, "val_loss": 3.0, "train_loss": 2.5},
               {"step": 4, "val_loss": 3.2, "train_loss": 0.6}]
    rows = checkpoint_rows(summary, log, val_log)
    assert [(r["name"], r["path"], r["step_loss"], r["train_loss"], r["val_loss"], r["best"]) for r in rows] == [
        ("checkpoint_step_2", "a", 2.0, 2.5, 3.0, True), ("final_lora_weights", "b", 0.0, 0.6, 3.2, False)]
    assert abs(rows[1]["gap"] - 2.6) < 1e-9
    signals = overfitting(val_log, {"lora": 3, "base": 0}, 10)
    assert "lowest at step 2 (3.000) and rose to 3.200 by step 4" in signals[0]
    assert "from +0.500 at step 2 to +2.600 at step 4: widening" in signals[1]
    assert signals[2] == "Answers repeating 50 characters of a training example verbatim: LoRA 3/10 (30%), base 0/10 (0%)."
    assert "no sign of overfitting" in overfitting(val_log[:2], {}, 0)[0]
    assert "No held-out loss was measured" in overfitting([], {}, 0)[0]


def _cells(table_html: str) -> list[list[str]]:
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table_html)][1:]


@pytest.mark.slow
def test_report_html_shows_the_run_as_logged(tmp_path, small_data, tiny):
    val = tmp_path / "small.val.jsonl"
    lines = small_data.read_text().splitlines(keepends=True)
    small_data.write_text("".join(lines[:32]))
    val.write_text("".join(lines[32:]))
    run = TrainingRun(training_settings(small_data, tmp_path / "runs", val_data=str(val), run_name="r",
                                        base_model=str(tiny), device="cpu")).open()
    summary = train(run)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    prompts = [{"messages": [{"role": "user", "content": "What is 2 < 3 & why?"}]},
               {"messages": [{"role": "user", "content": "Hello!"}]},
               {"messages": [{"role": "user", "content": "Hello!"}], "tools": [tool]}]
    results = compare(summary.final_lora_weights, prompts, SampleSettings(compare_base=True, max_tokens=8))
    # A prompt's tools are offered with it, as in training: its rendered prompt lists them.
    plain, offered = results["results"][1:]
    assert offered["tools"] == [tool] and "tools" not in plain
    assert offered["prompt_tokens"] > plain["prompt_tokens"] + 20
    report = write_report(summary, results)

    run_dir = tmp_path / "runs" / "r"
    page = (run_dir / "report.html").read_text()
    train_log = json.loads((run_dir / "training_log.json").read_text())
    val_log = json.loads((run_dir / "validation_log.json").read_text())
    assert [r["step"] for r in val_log] == [0, 2, 4]  # base, checkpoint, final

    # The plot is loss.png, embedded: no file or network needed to see it.
    [src] = re.findall(r'<img [^>]*src="([^"]+)"', page)
    png = (run_dir / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and src == "data:image/png;base64," + base64.b64encode(png).decode()
    assert not re.search(r'(src|href)="(https?:)?//', page)
    # Its curves are the logs' points, and so are the tables beside it.
    fig = loss_figure(train_log, val_log, starting_point(summary))
    train_line, val_line, measured_line = fig.axes[0].lines[:3]
    assert train_line.get_xydata().tolist() == [[r["step"], r["loss"]] for r in train_log]
    assert val_line.get_xydata().tolist() == [[r["step"], r["val_loss"]] for r in val_log]
    assert measured_line.get_xydata().tolist() == [[r["step"], r["train_loss"]] for r in val_log]
    log_table = re.search(r'<table id="training-log">(.*?)</table>', page, re.S).group(1)
    assert [(int(c[0]), float(c[1])) for c in _cells(log_table)] == \
        [(r["step"], round(r["loss"], 6)) for r in train_log]
    val_table = re.search(r'<table id="validation-log">(.*?)</table>', page, re.S).group(1)
    assert [(int(c[0]), float(c[1])) for c in _cells(val_table)] == \
        [(r["step"], round(r["val_loss"], 6)) for r in val_log]

    # Every prompt, and both answers to it, escaped.
    for r in results["results"]:
        assert html.escape(r["prompt"][-1]["content"]) in page
        assert html.escape(r["lora_response"]) in page and html.escape(r["base_response"]) in page
    assert "What is 2 &lt; 3 &amp; why?" in page

    # The summary: held-out loss of base, LoRA and best, the checkpoints, the signals.
    assert f"{summary.val_loss_base:.4f}" in page and f"{summary.val_loss_final:.4f}" in page
    assert "checkpoint_step_2" in page and "final_lora_weights" in page
    assert "verbatim" in page and f"{summary.tokens:,}" in page
    assert report["metrics"]["verbatim"].keys() == {"lora", "base"}
    assert (run_dir / "report.md").read_text() == report["markdown"]
    # In markdown (the report artifact), model and user text is escaped and keeps its lines.
    assert "> What is 2 \\< 3 & why?" in report["markdown"]
    for r in results["results"]:
        assert md_quote(r["lora_response"]) in report["markdown"]


def test_markdown_shows_model_text_as_written():
    assert md_text("10*8 = 80. Now 8*10, _x_ `y` [a](b) <b> # h | t") == \
        "10\\*8 = 80\\. Now 8\\*10, \\_x\\_ \\`y\\` \\[a\\]\\(b\\) \\<b\\> \\# h \\| t"
    assert md_quote("first\n\n    indented") == "> first\n> \n>     indented"
    assert md_cell("two\nlines | here") == "two lines \\| here"
