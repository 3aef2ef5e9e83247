"""An adapter trained here behaves the same when served as a user elsewhere would serve it: plain
transformers + PEFT, prompts through `tokenizer.apply_chat_template`, with no lora_pipeline code
in the loop (the base model folder is the converted SmolLM2, which the hub id names)."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PROMPTS, SAMPLE
from lora_pipeline.evaluate import compare, load_prompts
from lora_pipeline.models import SMOLLM2, resolve_local_model
from lora_pipeline.settings import SampleSettings
from lora_pipeline.train import TrainingRun, train
from training import training_settings

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short local run: 4 steps of 4 on 16 conversations, 4 held out."""
    tmp = tmp_path_factory.mktemp("served")
    lines = SAMPLE.read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(lines[:16]))
    (tmp / "val.jsonl").write_text("".join(lines[-4:]))
    cfg = training_settings(tmp / "train.jsonl", tmp, val_data=str(tmp / "val.jsonl"), save_every=0, run_name="r")
    summary = train(TrainingRun(cfg).open())
    prompts = load_prompts(str(PROMPTS))[:5] + load_prompts(str(tmp / "val.jsonl"))
    pipeline = compare(summary.final_lora_weights, prompts, SampleSettings(max_tokens=MAX_TOKENS, temperature=0))
    val_log = json.loads((tmp / "r" / "validation_log.json").read_text())
    return {"adapter": summary.final_lora_weights, "prompts": prompts, "val": tmp / "val.jsonl",
            "answers": [r["lora_response"] for r in pipeline["results"]], "val_loss": val_log[-1]["val_loss"]}


def greedy_answers(model, tokenizer, prompts):
    answers = []
    for prompt in prompts:  # conversations without tools, as load_prompts gives them
        ids = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=False)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def held_out_nll(model, tokenizer, path):
    """Mean NLL per assistant token (each turn's text and its end-of-turn token, as the model
    produces them after the template's generation prompt)."""
    total, count = 0.0, 0
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        ids = tokenizer.apply_chat_template(messages, return_dict=False)
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=False))
                end = ids.index(tokenizer.eos_token_id, start)
                mask[start:end + 1] = [1] * (end + 1 - start)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        weights = torch.tensor(mask[1:], dtype=torch.float32)
        total += float((nll * weights).sum())
        count += int(weights.sum())
    return total / count


@pytest.mark.slow
def test_plain_peft_and_merged_models_answer_and_score_like_the_pipeline(run):
    folder = resolve_local_model(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), run["adapter"]).eval()
    config = json.loads((Path(run["adapter"]) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2  # what a user elsewhere loads as the base
    peft_answers = greedy_answers(model, tokenizer, run["prompts"])
    peft_nll = held_out_nll(model, tokenizer, run["val"])
    merged = model.merge_and_unload().eval()
    merged_answers = greedy_answers(merged, tokenizer, run["prompts"])
    merged_nll = held_out_nll(merged, tokenizer, run["val"])
    print(f"\nheld-out NLL: pipeline {run['val_loss']:.7f}, PEFT {peft_nll:.7f}, merged {merged_nll:.7f}; "
          f"greedy answers equal: PEFT {sum(a == b for a, b in zip(peft_answers, run['answers']))}/"
          f"{len(run['answers'])}, merged {sum(a == b for a, b in zip(merged_answers, run['answers']))}/"
          f"{len(run['answers'])}")
    assert peft_answers == run["answers"]
    assert merged_answers == run["answers"]
    assert peft_nll == pytest.approx(run["val_loss"], abs=1e-5)  # 1.8407816 vs 1.8407815 here
    assert merged_nll == pytest.approx(run["val_loss"], abs=1e-5)
