"""Data preparation: 10,000 ultrachat-sized conversations (~1,500 tokens each) through the
prepare stage, against a naive per-row loop (json parse + one tokenizer call per row) and the
raw batched tokenizer alone (the limit). Runs alternate, best of `--repeats`.

    python bench/prepare.py [--rows 10000] [--repeats 2]
"""

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, write

from lora_pipeline.models import SMOLLM2, load_tokenizer
from lora_pipeline.prepare import prepare

WORDS = ("the ship sails over calm blue water while the crew sings songs of gold and distant "
         "islands under a bright morning sky").split()


def make_data(path: Path, rows: int) -> None:
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    with open(path, "w") as f:
        for i in range(rows):
            messages = []
            for _ in range(3):  # three exchanges, ~1,500 tokens in all, as in ultrachat
                messages += [{"role": "user", "content": f"{text(80)} {i}"},
                             {"role": "assistant", "content": text(400)}]
            f.write(json.dumps({"prompt": messages[0]["content"], "prompt_id": str(i), "messages": messages}) + "\n")


def naive(path: Path, tokenizer) -> int:
    tokens = 0
    for line in open(path):
        messages = json.loads(line)["messages"]
        tokens += len(tokenizer.apply_chat_template(messages, tokenize=True))
    return tokens


def batched_tokenizer(path: Path, tokenizer) -> int:
    texts = [m["content"] for line in open(path) for m in json.loads(line)["messages"]]
    return sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    tokenizer = load_tokenizer(SMOLLM2)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        make_data(data, a.rows)
        runs = {
            "pipeline": lambda: prepare(str(data), "train", Path(tmp) / "out.jsonl", max_length=2048, val_fraction=0),
            "naive_per_row": lambda: naive(data, tokenizer),
            "batched_tokenizer_only": lambda: batched_tokenizer(data, tokenizer),
        }
        best = best_of(runs, a.repeats)
    figures = {"rows": a.rows, "seconds": {k: round(v, 2) for k, v in best.items()},
               "rows_per_second": {k: round(a.rows / v) for k, v in best.items()},
               "pipeline_over_naive_speedup": round(best["naive_per_row"] / best["pipeline"], 2),
               "pipeline_over_limit_ratio": round(best["pipeline"] / best["batched_tokenizer_only"], 2)}
    write("prepare", figures)


if __name__ == "__main__":
    main()
