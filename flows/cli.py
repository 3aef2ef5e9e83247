"""`lora-pipeline`: the workflow's scripts as subcommands, each run as a Prefect flow.

    prepare_data.py        -> lora-pipeline prepare
    train_and_save_lora.py -> lora-pipeline train     (run_tinker_lora.py too)
    test_lora_model.py     -> lora-pipeline test
    inspect_tinker_api.py  -> lora-pipeline inspect
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from lora_pipeline.errors import PipelineError
from lora_pipeline.prepare import FORMATS
from lora_pipeline.render import OVERFLOW_CHOICES
from lora_pipeline.train import TrainConfig, preflight

TRAIN_FLAGS = ("batch", "max_steps", "rank", "learning_rate", "save_every", "output_dir",
               "backend", "base_model", "seed", "run_name", "max_length", "on_overflow",
               "request_timeout", "start_over", "val_data")


def _prepare_args(p):
    p.add_argument("--dataset", required=True,
                   help="hub dataset id, or a local .jsonl/.json/.parquet/.csv file or folder")
    p.add_argument("--split", default="train", help="dataset split (hub datasets; default train)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="a seeded random sample of N rows (the first N with --first)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of kept rows held out for validation (default 0.05)")


def _train_args(p):
    d = TrainConfig(data="")
    p.add_argument("--batch", type=int, default=d.batch, help=f"examples per step (default {d.batch})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="training steps (0 = one full epoch)")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help=f"peak learning rate, decayed linearly (default {d.learning_rate})")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"checkpoint every N steps (0 = only final; default {d.save_every})")
    p.add_argument("--output-dir", default=d.output_dir, help=f"where run folders go (default {d.output_dir})")
    p.add_argument("--backend", default=d.backend,
                   help="local, tinker or auto (tinker when TINKER_API_KEY is set; default)")
    p.add_argument("--base-model", default=None, help="default: SmolLM2-135M-Instruct locally, Qwen/Qwen3-8B on tinker")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-name", default=None,
                   help="run folder name (default lora_<model>_<time>); an existing run of that name "
                        "with the same data and settings is continued from its last checkpoint")
    p.add_argument("--start-over", action="store_true",
                   help="replace an existing run folder of that name instead of continuing it")
    p.add_argument("--max-length", type=int, default=d.max_length, help="token limit per example")
    p.add_argument("--on-overflow", choices=OVERFLOW_CHOICES, default=d.on_overflow,
                   help="what to do with longer examples (default truncate)")
    _timeout_arg(p)


def _timeout_arg(p):
    d = TrainConfig(data="")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help=f"seconds any one Tinker call may take before it is retried (default {d.request_timeout:g})")


def _test_args(p):
    p.add_argument("--test-prompts", default=None,
                   help="JSON list of strings or message lists, or a chat .jsonl (its prompts); "
                        "`run` defaults to the held-out split's prompts")
    p.add_argument("--max-tokens", type=int, default=150)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lora-pipeline", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert a dataset to chat JSONL")
    _prepare_args(p)
    p.add_argument("--output", required=True, help="the JSONL file to write")
    p.add_argument("--first", action="store_true", help="with --max-examples: the first N rows")
    p.add_argument("--config-name", default=None, help="the hub dataset's configuration, if it has several")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="auto",
                   help="row shape (default: detected per row)")
    p.add_argument("--prompt-column", help="with --format columns: the user turn's column")
    p.add_argument("--response-column", help="with --format columns: the assistant turn's column")
    p.add_argument("--system-column", help="with --format columns: an optional system prompt column")
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of dropping it")
    p.add_argument("--max-length", type=int, default=1024, help="token limit per example (0: no token stats)")
    p.add_argument("--on-overflow", choices=OVERFLOW_CHOICES, default="truncate",
                   help="longer examples: keep (training truncates them) or drop (default truncate)")
    p.add_argument("--base-model", default=None, help="whose tokenizer counts tokens (default SmolLM2)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train", help="train a LoRA adapter")
    p.add_argument("--data", required=True, help="chat JSONL from `prepare`")
    p.add_argument("--val-data", default=None,
                   help="held-out chat JSONL for validation loss (default: the .val.jsonl beside --data)")
    _train_args(p)
    p = sub.add_parser("test", help="answer prompts with a LoRA (and its base)")
    p.add_argument("--lora-weights", required=True, help="a run's final_lora_weights/ or checkpoint")
    p.add_argument("--base-model", default=None, help="default: the base recorded with the adapter")
    p.add_argument("--compare-base", action="store_true", help="also answer with the base model")
    _test_args(p)
    _timeout_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="lora_test_results.json")
    p = sub.add_parser("run", help="prepare, train, test and report in one flow")
    _prepare_args(p)
    _train_args(p)
    _test_args(p)
    p.add_argument("--no-compare-base", dest="compare_base", action="store_false")
    p = sub.add_parser("inspect", help="the Tinker SDK, its methods and the service's models")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the service")
    sub.add_parser("serve", help="serve the lora-pipeline/nightly deployment (needs PREFECT_API_URL)")
    return ap


def _train_config(a, data: str) -> TrainConfig:
    flags = {k: getattr(a, k, None) for k in TRAIN_FLAGS}
    if a.command == "train" and flags["val_data"] is None:  # `run` takes it from its prepare stage
        beside = Path(data).with_name(Path(data).stem + ".val.jsonl")
        flags["val_data"] = str(beside) if beside.exists() else None
    return TrainConfig(data=data, **flags)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    # Offline machines cannot send Prefect's telemetry; trying logs errors (ARCHITECTURE.md).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return _dispatch(a)
    except PipelineError as e:
        print(f"lora-pipeline {a.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only folder: earlier files are intact
        print(f"lora-pipeline {a.command}: error: cannot write {e.filename or 'output'}: {e.strerror or e}. "
              "Free space or choose another --output-dir; run the same command again to continue "
              "from the last checkpoint.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lora-pipeline {a.command}: interrupted", file=sys.stderr)
        return 130


def _dispatch(a) -> int:
    if a.command == "inspect":
        from lora_pipeline.inspect_tinker import inspect

        print("\n".join(inspect(a.timeout)))
        return 0
    if a.command == "serve":
        if not os.environ.get("PREFECT_API_URL"):
            raise PipelineError("PREFECT_API_URL is not set: start a server (`make server`) and "
                                "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
        from deployments.nightly import serve

        serve()
        return 0

    # Inputs are checked here, before Prefect starts, so that a mistake costs a second and
    # one line of output rather than a server start and a traceback.
    if a.command == "train":
        cfg = _train_config(a, a.data)
        preflight(cfg)
    elif a.command == "run":
        preflight(_train_config(a, ""), read_data=False)
    elif a.command == "test":
        from lora_pipeline.evaluate import adapter_info, load_prompts

        adapter_info(a.lora_weights)
        load_prompts(a.test_prompts)

    from flows import pipeline
    from lora_pipeline.report import verdict

    if a.command == "prepare":
        from lora_pipeline.prepare import summary

        options = dict(config_name=a.config_name, fmt=a.fmt, first=a.first, seed=a.seed,
                       val_fraction=a.val_fraction, max_length=a.max_length or None, on_overflow=a.on_overflow,
                       base_model=a.base_model, strict=a.strict,
                       columns={"prompt": a.prompt_column, "response": a.response_column, "system": a.system_column})
        print(summary(pipeline.prepare(a.dataset, a.output, a.split, a.max_examples, options)))
    elif a.command == "train":
        s = pipeline.train(dataclasses.asdict(cfg))
        for entry in s["checkpoints"]:
            print(f"{entry['name']} (step {entry['step']}): {entry['state_path'] or entry['sampler_path']}")
        print(f"Run folder: {s['run_dir']}\nFinal LoRA weights: {s['final_lora_weights']}\n{verdict(s)}")
    elif a.command == "test":
        out = pipeline.test(a.lora_weights, a.output, a.test_prompts, a.base_model, a.compare_base,
                            a.max_tokens, a.temperature, a.seed, a.request_timeout)
        print(f"Results: {Path(out)}")
    elif a.command == "run":
        params = {k: getattr(a, k) for k in TRAIN_FLAGS if k != "val_data"}
        s = pipeline.lora_pipeline(dataset=a.dataset, split=a.split, max_examples=a.max_examples,
                                   val_fraction=a.val_fraction,
                                   test_prompts=a.test_prompts, max_tokens=a.max_tokens,
                                   temperature=a.temperature, compare_base=a.compare_base, **params)
        print(f"\n{verdict(s)}\nRun folder: {s['run_dir']}\nAnswers: {s['results']}\nReport: {s['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
