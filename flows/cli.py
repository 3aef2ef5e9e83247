"""`lora-pipeline`: the workflow's scripts as subcommands, each run as a Prefect flow.

    prepare_data.py        -> lora-pipeline prepare
    train_and_save_lora.py -> lora-pipeline train     (run_tinker_lora.py too)
    test_lora_model.py     -> lora-pipeline test
    inspect_tinker_api.py  -> lora-pipeline inspect

The flags are the settings of lora_pipeline.settings. Only that module is imported before a
command runs, so that `--help` and a mistyped flag answer at once, without torch.
"""

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from pathlib import Path

from lora_pipeline import settings as S
from lora_pipeline.data import check_output_file
from lora_pipeline.errors import PipelineError

COMMANDS = {  # command -> (help, its settings' fields, defaults that differ for it)
    "prepare": ("convert a dataset to chat JSONL", S.fields_of(S.PrepareSettings), None),
    "train": ("train a LoRA adapter", S.fields_of(S.TrainSettings), None),
    "test": ("answer prompts with a LoRA (and its base)", S.fields_of(S.EvaluateSettings), None),
    "run": ("prepare, train, test and report in one flow", S.flat_fields(), S.PIPELINE_DEFAULTS),
    "sweep": ("`run` for each combination of learning rates and ranks, compared", S.sweep_fields(),
              S.PIPELINE_DEFAULTS),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lora-pipeline", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (help, fields, overrides) in COMMANDS.items():
        S.add_flags(sub.add_parser(name, help=help), fields, overrides)
    p = sub.add_parser("export", help="a Tinker checkpoint as a PEFT adapter folder (download)")
    p.add_argument("source", help="a run folder (its final weights), a checkpoint folder, or a tinker:// path")
    p.add_argument("--output", required=True, help="the folder to write the adapter into")
    S.add_flags(p, S.fields_of(S.ExportSettings))
    p = sub.add_parser("inspect", help="the Tinker SDK, its methods and the service's models")
    S.add_flags(p, S.fields_of(S.InspectSettings))
    sub.add_parser("serve", help="serve the lora-pipeline/nightly deployment (needs PREFECT_API_URL)")
    output_dir = [f for f in S.fields_of(S.TrainSettings) if f.name == "output_dir"]
    p = sub.add_parser("champion", help="the adapter to serve: the champion of an output folder (runs with --eval-data)")
    S.add_flags(p, output_dir)
    p = sub.add_parser("promote", help="make a run the champion by hand, recorded with who, when and why")
    p.add_argument("run", help="the run folder's name, as `lora-pipeline champion` and nightly.html show it")
    p.add_argument("--why", default="", help="the reason, kept in the registry's history")
    S.add_flags(p, output_dir)
    p = sub.add_parser("rollback", help="the champion goes back to the one before it, recorded with who, when and why")
    p.add_argument("--why", default="", help="the reason, kept in the registry's history")
    S.add_flags(p, output_dir)
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM, met like Ctrl-C: every `finally` runs (the run folder is released, the temporary
    server stopped) and the command ends with its line, instead of vanishing without one."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    # Offline machines cannot send Prefect's telemetry; trying logs errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    on_main_thread = threading.current_thread() is threading.main_thread()
    earlier = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return _dispatch(a)
    except PipelineError as e:
        print(f"lora-pipeline {a.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only folder: earlier files are intact
        print(f"lora-pipeline {a.command}: error: {os_error_message(a.command, e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        again = ("; run the same command again to continue from the last checkpoint"
                 if a.command in ("train", "run", "sweep") else "")
        print(f"lora-pipeline {a.command}: {how}{again}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if on_main_thread:  # main() called in a process of another's (a test) leaves it as it was
            signal.signal(signal.SIGTERM, earlier)


def os_error_message(command: str, e: OSError) -> str:
    """What went wrong with a file, and what to do, for the error the system gave."""
    where = e.filename or "a file"
    option = "--output" if command in ("prepare", "test", "export") else "--output-dir"
    again = (" Earlier files are intact; run the same command again to continue from the last checkpoint."
             if command in ("train", "run", "sweep") else "")
    fixes = {
        errno.ENOSPC: f"the disk is full. Free space, or choose another {option}.",
        errno.EDQUOT: f"the disk quota is used up. Free space, or choose another {option}.",
        errno.EFBIG: f"the file grew past the allowed size. Free space, or choose another {option}.",
        errno.EIO: f"the write failed ({e.strerror}): the disk may be full. Free space, or choose another {option}.",
        errno.EACCES: f"permission denied. Choose a folder you can write to with {option}.",
        errno.EPERM: f"the operation is not permitted. Choose a folder you can write to with {option}.",
        errno.EROFS: f"the file system is read-only. Choose another {option}.",
        errno.EEXIST: f"something that is not a folder is already there. Choose another {option}.",
        errno.ENOTDIR: f"part of that path is a file, not a folder. Choose another {option}.",
        errno.EISDIR: f"that is a folder, not a file. Give a file path with {option}.",
        errno.ELOOP: f"a symbolic link is in the way, which lora-pipeline does not follow. Choose another {option}.",
        errno.ENOENT: "it does not exist. Check the path.",
    }
    return f"{where}: " + fixes.get(e.errno, f"{e.strerror or e}. Check the path, or choose another {option}.") + again


def _check_inputs(command: str, params: dict) -> None:
    """What can be checked before Prefect starts, so that a mistake costs a second and one
    line of output rather than a server start and a traceback. The flows check again: they
    may run without this CLI (a deployment)."""
    if command == "prepare":
        S.build(S.PrepareSettings, params).check()
    elif command == "train":
        from lora_pipeline.run_config import RunConfig

        RunConfig(S.build(S.TrainSettings, params)).read_inputs()
    elif command in ("run", "sweep"):
        from lora_pipeline.engines import resolve_engine
        from lora_pipeline.models import check_rank

        if command == "sweep":
            from lora_pipeline.sweep import configurations

            sweep = S.build(S.SweepSettings, params)
            sweep.check()
            for config in configurations(sweep, params):
                S.PipelineSettings.of(config)
        else:
            S.PipelineSettings.of(params)
        backend, base_model = resolve_engine(params["backend"], params["base_model"])
        if backend == "local":
            for rank in params["rank"] if isinstance(params["rank"], tuple) else (params["rank"],):
                check_rank(base_model, rank)
        if params["test_prompts"]:  # before the data is prepared and a model trained, not after
            from lora_pipeline.evaluate import load_prompts

            load_prompts(params["test_prompts"])
    elif command == "test":
        from lora_pipeline.engines import check_base_model
        from lora_pipeline.evaluate import adapter_info, load_prompts

        S.build(S.EvaluateSettings, params).check()
        check_output_file(params["output"], "--output", [params["test_prompts"] or ""])
        info = adapter_info(params["lora_weights"])
        load_prompts(params["test_prompts"])
        if params["base_model"] or info["base_model"]:
            check_base_model(info["backend"], params["base_model"] or info["base_model"])


def _dispatch(a) -> int:
    if a.command == "inspect":
        from lora_pipeline.inspect_tinker import inspect

        S.InspectSettings(timeout=a.timeout).check()
        for line in inspect(a.timeout):
            print(line, flush=True)
        return 0
    if a.command == "export":
        from lora_pipeline.export import export

        S.ExportSettings(request_timeout=a.request_timeout).check()
        print(f"PEFT adapter: {export(a.source, a.output, a.request_timeout)}")
        return 0
    if a.command in ("champion", "promote", "rollback"):
        from lora_pipeline.promotion import write_trend
        from lora_pipeline.registry import Registry

        registry = Registry(a.output_dir)
        if a.command == "champion":
            champion = registry.champion()
            if not champion:
                raise PipelineError(f"no champion in {a.output_dir} yet: a run with --eval-data that passes the gate "
                                    "makes one (or `lora-pipeline promote RUN`)")
            print(champion["adapter"] + (f"\n{champion['tinker']}" if champion.get("tinker") else ""))
            return 0
        entry = registry.promote(a.run, why=a.why) if a.command == "promote" else registry.rollback(why=a.why)
        write_trend(a.output_dir)
        print(f"champion: {entry['run']} (was {entry['from'] or 'none'}); recorded in {registry.path}")
        return 0
    if a.command == "serve":
        if not os.environ.get("PREFECT_API_URL"):
            raise PipelineError("PREFECT_API_URL is not set: start a server (`make server`) and "
                                "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
        from lora_pipeline.flows.server import check_api_url

        check_api_url(os.environ["PREFECT_API_URL"])
        from lora_pipeline.deployments.serve import serve

        serve()
        return 0

    params = {k: v for k, v in vars(a).items() if k != "command"}
    _check_inputs(a.command, params)

    from lora_pipeline.flows.server import temporary_server

    with temporary_server() as ready, _tracebacks_off_the_console():
        import lora_pipeline.flows.pipeline  # noqa: F401  (Prefect and torch: imported while the server starts)

        ready()
        _run_flow(a.command, params)
    return 0


def said_once(record) -> bool:
    """A console filter: False for what the terminal would otherwise show twice or more. A
    user's mistake (PipelineError) is logged by the task and the flow as each fails and
    finishes, then printed by main() as the one line that matters; prepare's summary is logged
    by its task and printed by the command on stdout, where a script reads it. The UI keeps
    them all."""
    import logging

    text = record.getMessage()
    return not ("PipelineError(" in text or "PipelineError:" in text
                or (record.levelno == logging.INFO and text.startswith("Kept ") and " rows: " in text))


@contextlib.contextmanager
def _tracebacks_off_the_console():
    """Prefect logs a failure's traceback at every level it passes (task, flow); on a
    terminal that buries the one line that matters, which main() prints last. The tracebacks
    stay in the Prefect server's logs (the UI) and in the failure note."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # Prefect sets its handlers up on first use: they must exist to be wrapped

    class WithoutTraceback(logging.Formatter):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def format(self, record):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "stack_info": None})
            return self.inner.format(record)

    handlers = [h for name in ("prefect", "") for h in logging.getLogger(name).handlers
                if isinstance(h, PrefectConsoleHandler)]
    formatters = [h.formatter for h in handlers]
    for h in handlers:
        h.setFormatter(WithoutTraceback(h.formatter))
        h.addFilter(said_once)
    try:
        yield
    finally:
        for h, f in zip(handlers, formatters):
            h.setFormatter(f)
            h.removeFilter(said_once)


def _run_flow(command: str, params: dict) -> None:
    from lora_pipeline.flows import pipeline
    from lora_pipeline.report import verdict

    if command == "prepare":
        from lora_pipeline.prepare import summary

        print(summary(pipeline.prepare(**params)))
    elif command == "train":
        s = pipeline.train(**params)
        for entry in s.checkpoints:
            print(f"{entry.name} (step {entry.step}): {entry.path}")
        print(f"Run folder: {s.run_dir}\nFinal LoRA weights: {s.final_lora_weights}\n{verdict(s)}")
    elif command == "test":
        results = Path(pipeline.test(**params))
        _say_limit(results)
        print(f"Results: {results}")
    elif command == "run":
        out = pipeline.lora_pipeline(**params)
        if "unchanged" in out:
            print(out["unchanged"])
            return
        s = out["summary"]
        _say_limit(Path(out["results"]))
        decided = f"\n{out['decision']}" if out["decision"] else ""
        print(f"\n{verdict(s)}{decided}\nRun folder: {s.run_dir}\nAnswers: {out['results']}\nReport: {out['report']}")
    elif command == "sweep":
        from lora_pipeline.flows.sweep import lora_sweep

        out = lora_sweep(**params)
        best = out["best"]
        print(f"\nBest: {best['configuration']}" if best else "", f"\nReport: {out['report']}")


def _say_limit(results: Path) -> None:
    """A --max-prompts limit that left prompts unanswered is said, never silent."""
    import json

    from lora_pipeline.evaluate import limit_note

    note = limit_note(json.loads(results.read_text()))
    if note:
        print(note)


if __name__ == "__main__":
    sys.exit(main())
