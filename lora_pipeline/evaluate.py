"""Answers of the LoRA and of its base model to the same prompts, side by side."""

import json
import time
from pathlib import Path

from tinker import types

from .data import check_input_file, read_chat_jsonl, write_json
from .engines import INFO_FILE, check_base_model, make_engine
from .errors import PipelineError
from .settings import EvaluateSettings, SampleSettings

DEFAULT_PROMPTS = [
    "Hello!",
    "What is the capital of France?",
    "Give me three tips for staying productive.",
    "Explain what a LoRA adapter is in two sentences.",
    "Write a haiku about the sea.",
]


def load_prompts(path: str | None) -> list[dict]:
    """Prompts as conversations, `{"messages": [...]}` (and `"tools": [...]` where the model is
    offered tools): from a JSON list of message lists, or of strings (user turns); or from a
    chat JSONL such as prepare's validation split, whose conversations up to their last answer
    become the prompts, each with its tools. All of them: a user's file is answered whole
    (--max-prompts cuts it, and the results say so)."""
    if not path:
        return [{"messages": [{"role": "user", "content": p}]} for p in DEFAULT_PROMPTS]
    if str(path).endswith(".jsonl"):
        return [{**row, "messages": row["messages"][:-1]} for row in read_chat_jsonl(Path(path), "--test-prompts")]
    check_input_file(path, "--test-prompts")
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # -sig: a leading BOM is not JSON
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"--test-prompts {path}: not valid JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise PipelineError(f"--test-prompts {path}: expected a non-empty JSON list of strings or of "
                            'message lists like [{"role": "user", "content": "..."}]')
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = [{"role": "user", "content": item}]
        ok = isinstance(item, list) and item and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in item)
        if not ok:
            raise PipelineError(f"--test-prompts {path}: item {i} is neither a string nor a list of "
                                '{"role", "content"} messages')
        prompts.append({"messages": item})
    return prompts


def _json_object(path: Path, flag: str, value: str) -> dict:
    """A JSON object file of an adapter folder; a damaged one is said, not a traceback."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{flag} {value}: {path.name} cannot be read ({type(e).__name__}: {e}); the folder is "
                            "damaged: export or train it again") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{flag} {value}: {path.name} is not a JSON object; the folder is damaged")
    return obj


def adapter_info(lora_weights: str) -> dict:
    """What the training run recorded with the adapter: backend, base model, rank (and the
    tinker:// sampler path). A PEFT folder from elsewhere works too. A record that is damaged or
    lacks what it needs is said as such."""
    folder = Path(lora_weights)
    flag = "--lora-weights"
    if (folder / INFO_FILE).is_file():
        info = _json_object(folder / INFO_FILE, flag, lora_weights)
        if info.get("backend") == "tinker" and info.get("sampler_path"):
            return {**info, "folder": folder}
        if info.get("backend") == "local" and isinstance(info.get("rank"), int) and info.get("base_model"):
            return {**info, "folder": folder}
    if (folder / "adapter_config.json").is_file():
        config = _json_object(folder / "adapter_config.json", flag, lora_weights)
        if not isinstance(config.get("r"), int) or config["r"] < 1:
            raise PipelineError(f"{flag} {lora_weights}: adapter_config.json has no LoRA rank (r); it is not a "
                                "complete PEFT LoRA adapter")
        return {"backend": "local", "base_model": config.get("base_model_name_or_path"),
                "rank": config["r"], "folder": folder}
    if (folder / INFO_FILE).is_file():
        raise PipelineError(f"{flag} {lora_weights}: {INFO_FILE} records neither a local adapter (backend, "
                            "base_model, rank) nor a Tinker sampler path, and there is no adapter_config.json; "
                            "the folder is damaged: pass a run's final_lora_weights/")
    raise PipelineError(f"{flag} {lora_weights}: not LoRA weights (no adapter_config.json, no "
                        "sampler path); pass a run's final_lora_weights/")


# Prompts per request to a remote engine: all are in flight at once, and each answered request
# is a progress report. The local engine answers all the prompts in one batch (several times
# faster than batches of 8 on a CPU) and reports as it generates, at most every PROGRESS_EVERY_S.
ANSWER_BATCH = 8
PROGRESS_EVERY_S = 5.0


def _answer(engine, inputs: list, params: types.SamplingParams, who: str, progress) -> list:
    """Answers to `inputs`, from the LoRA or the base (`who`); `progress(who, done, total,
    tokens, seconds, fraction)` as they come (answers finished, tokens so far, the share of the
    work done), so that a slow evaluation and a hung one look different."""
    started = time.monotonic()

    def report(done: int, tokens: int, fraction: float) -> None:
        if progress:
            progress(who, done, len(inputs), tokens, time.monotonic() - started, fraction)
    if engine.remote:
        batches = [engine.sample(inputs[i:i + ANSWER_BATCH], params, lora=who == "lora")
                   for i in range(0, len(inputs), ANSWER_BATCH)]
        sequences = []
        for batch in batches:
            sequences += batch.result()
            report(len(sequences), sum(len(q.tokens) for q in sequences), len(sequences) / len(inputs))
        return sequences
    last = [time.monotonic()]

    def generating(done: int, tokens: int, steps: int) -> None:
        if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            report(done, tokens, max(done / len(inputs), steps / params.max_tokens))
    sequences = engine.sample(inputs, params, lora=who == "lora", progress=generating).result()
    report(len(sequences), sum(len(q.tokens) for q in sequences), 1.0)
    return sequences


def compare(lora_weights: str, prompts: list[dict], s: SampleSettings, progress=None) -> dict:
    """The workflow's test output: LoRA answers (and base answers with `compare_base`) to
    `prompts` (conversations, as load_prompts gives them), with the same settings and seed for
    both."""
    info = adapter_info(lora_weights)
    base_model = s.base_model or info["base_model"]
    if not base_model:
        raise PipelineError(f"--lora-weights {lora_weights}: no base model recorded; pass --base-model")
    check_base_model(info["backend"], base_model)  # a missing or broken one is said as such
    engine = make_engine(info["backend"], base_model, rank=info["rank"], seed=s.seed,
                         request_timeout=s.request_timeout, weights=info, device=s.device, dtype=s.dtype)
    inputs = [engine.renderer.build_generation_prompt(p["messages"], p.get("tools")) for p in prompts]
    for i, prompt in enumerate(inputs, start=1):
        if engine.context_length and prompt.length + s.max_tokens > engine.context_length:
            engine.close()
            raise PipelineError(
                f"test prompt {i} of {len(inputs)} is {prompt.length} tokens: with --max-tokens {s.max_tokens} it "
                f"does not fit {base_model}'s context of {engine.context_length} tokens, and an answer past it "
                "would be noise. Shorten that prompt or lower --max-tokens")
    params = types.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, seed=s.seed)
    try:
        answers = {who: _answer(engine, inputs, params, who, progress)
                   for who in (("lora", "base") if s.compare_base else ("lora",))}
    finally:
        engine.close()
    results = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt["messages"], **({"tools": prompt["tools"]} if prompt.get("tools") else {}),
               "prompt_tokens": inputs[i].length}
        for who, seqs in answers.items():
            row[f"{who}_response"] = engine.tokenizer.decode(seqs[i].tokens, skip_special_tokens=True).strip()
            row[f"{who}_tokens"] = len(seqs[i].tokens)
            row[f"{who}_stop_reason"] = seqs[i].stop_reason
        results.append(row)
    return {
        "base_model": base_model, "lora_weights": str(lora_weights), "results": results,
        "settings": {"max_tokens": s.max_tokens, "temperature": s.temperature, "seed": s.seed},
    }


def run_test(s: EvaluateSettings, progress=None) -> dict:
    """`lora-pipeline test`: answers written to `s.output`."""
    s.check()
    prompts = load_prompts(s.test_prompts)
    result = compare(s.lora_weights, prompts[:s.max_prompts or None], s, progress)
    result["prompts_given"] = len(prompts)  # more than answered only with --max-prompts, said by limit_note
    write_json(Path(s.output), result)
    return result


def limit_note(result: dict) -> str | None:
    """The line that says a --max-prompts limit left prompts unanswered, if it did."""
    answered, given = len(result["results"]), result.get("prompts_given", len(result["results"]))
    if answered < given:
        return (f"Answered the first {answered} of {given} test prompts (--max-prompts {answered}); "
                "--max-prompts 0 answers all")
    return None
