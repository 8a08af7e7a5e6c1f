"""Hugging Face model folders (`config.json` + safetensors / pytorch_model.bin, tokenizer files).

The model is built by `transformers` from its config (its own class, or AutoModel), with the weights
loaded by `from_pretrained` — meta-device init, so peak memory is about one copy of the weights; tied
weights and key renames are the library's business. Never the network: local files only, and
`trust_remote_code` only behind --trust-pickle (remote code runs like a pickle would).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from pathlib import Path

from deadrelu_cli.display import shown_names
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import check_folder_files, parse_json
from deadrelu_cli.loaders.model import LoadedModel, LoadOptions
from deadrelu_cli.options import DTYPE_NAMES

EXTRA_HINT = "pip install 'deadrelu[transformers]'"
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def offline() -> None:
    """No download, ever: the hub libraries read these at import and at every call."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def import_transformers(path: str | Path):
    offline()
    try:
        import transformers
    except ImportError:
        raise UserError(
            f"{path}: a Hugging Face model folder needs the transformers extra: {EXTRA_HINT}"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # stderr is for deadrelu's own progress and errors
    transformers.utils.logging.set_verbosity_error()
    return transformers


def weight_files(folder: Path) -> list[Path]:
    """The weight files a folder holds (the shards an index names, or the single file)."""
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = parse_json(index.read_text(), index)["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{index}: not a valid weight index ({exc})") from None
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return []


def folder_sha256(folder: Path) -> str:
    """sha256 over config.json and the weight files (names and bytes): a folder's identity for merge/diff."""
    digest = hashlib.sha256()
    for path in [folder / "config.json", *weight_files(folder)]:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def model_class(transformers, config, folder: Path):
    """The class the config names (`architectures`), else AutoModel for its model type."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(name), None)
        if cls is None:
            continue  # a class of a later transformers: AutoModel below
        if (
            not isinstance(cls, type)
            or not issubclass(cls, transformers.PreTrainedModel)
            or cls is transformers.PreTrainedModel
        ):
            raise UserError(
                f"{folder}/config.json: architectures names {name!r}, which is not a transformers model class; "
                "the folder is damaged or not a model folder"
            )
        return cls
    return transformers.AutoModel


def torch_dtype(name: str | None):
    import torch

    if name is None:
        return "auto"  # as stored (a bf16 checkpoint runs in bf16, like a bf16 state_dict)
    if name not in DTYPE_NAMES:
        raise UserError(f"--dtype {name!r}: choose bf16, fp16 or fp32")
    return getattr(torch, DTYPE_NAMES[name])


MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", re.IGNORECASE)


def parse_max_memory(text: str) -> dict:
    """--max-memory "0=20GiB,cpu=64GiB" -> accelerate's max_memory ({0: "20GiB", "cpu": "64GiB"})."""
    limits: dict = {}
    for part in text.replace(" ", "").split(","):
        device, sep, size = part.partition("=")
        if not sep or not MEMORY_SIZE.fullmatch(size):
            raise UserError(
                f"--max-memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB (DEVICE: a GPU index, cpu or disk)"
            )
        key = int(device) if device.isdigit() else device.lower()
        if not isinstance(key, int) and key not in ("cpu", "disk", "mps"):
            raise UserError(f"--max-memory {text!r}: unknown device {device!r} (a GPU index, cpu or disk)")
        limits[key] = int(size) if size.isdigit() else size
    return limits


def _check_config_json(folder: Path) -> None:
    """config.json read once by us first: nesting that would overflow transformers' recursive config
    code (exit 3) is one line here; anything else wrong with it is transformers' to say."""
    path = folder / "config.json"
    try:
        parse_json(path.read_bytes(), path)
    except (OSError, ValueError):
        pass


# config keys that say how many blocks transformers builds (top level or in a sub-config)
LAYER_COUNT_KEYS = frozenset(
    {"num_hidden_layers", "num_layers", "n_layer", "encoder_layers", "decoder_layers", "num_decoder_layers"}
)
LAYER_COUNT_SLACK = 4, 64  # shared-weight models (ALBERT) declare more blocks than they store


def weight_names(folder: Path) -> list[str] | None:
    """The tensor names of a folder's weights, from its index or safetensors headers (no tensor is
    read); None for .bin weights, whose names only come with unpickling."""
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            return list(parse_json(index.read_text(), index)["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="numpy") as handle:
            return list(handle.keys())
    except Exception:  # a broken header is the loader's to report, in its own words
        return None


def check_declared_layers(folder: Path, config) -> None:
    """transformers builds (and fills at random) every block config.json declares before it reads a
    weight: a 50 KB folder declaring thousands of blocks would run for minutes. Refuse a declared count
    far beyond the block indices the weights hold."""
    names = weight_names(folder)
    if not names:
        return
    held = 1 + max((int(part) for name in names for part in name.split(".") if part.isdigit()), default=0)
    declared, stack = 0, [config.to_dict()]
    while stack:
        for key, value in stack.pop().items():
            if isinstance(value, dict):
                stack.append(value)
            elif key in LAYER_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
                declared = max(declared, value)
    factor, floor = LAYER_COUNT_SLACK
    if declared > floor and declared > factor * held:
        raise UserError(
            f"{folder}/config.json declares {declared} layers, but the folder's weights hold at most {held}: "
            "transformers would build every missing one at random; check that config.json belongs to these weights"
        )


def load_hf_folder(options: LoadOptions) -> LoadedModel:
    from concurrent.futures import ThreadPoolExecutor

    folder = Path(options.path)
    check_folder_files(folder, weight_files(folder))
    _check_config_json(folder)
    transformers = import_transformers(folder)
    if not weight_files(folder):
        raise UserError(
            f"{folder}: a model folder without weights (no model.safetensors, sharded index or pytorch_model.bin)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=options.trust_pickle
        )
    except ValueError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"{folder}: the model's code ships in the folder (auto_map); pass --trust-pickle to run it, only if you trust its source"
            ) from None
        raise UserError(f"{folder}/config.json: {text}") from None
    except (OSError, KeyError, RecursionError) as exc:  # (another JSON file of the folder nested too deeply)
        raise UserError(f"{folder}/config.json: cannot read it ({exc})") from None
    if getattr(config, "auto_map", None) and not options.trust_pickle:
        raise UserError(
            f"{folder}: the model's code ships in the folder (auto_map); pass --trust-pickle to run it, only if you trust its source"
        )
    check_declared_layers(folder, config)
    cls = model_class(transformers, config, folder)
    kwargs = {
        "config": config,
        "local_files_only": True,
        "trust_remote_code": options.trust_pickle,
        "dtype": torch_dtype(options.dtype),
    }
    if options.max_memory and not options.device_map:
        raise UserError(
            "--max-memory applies with --device-map (e.g. --device-map auto --max-memory 0=20GiB,cpu=64GiB)"
        )
    offload = None
    if options.device_map:
        kwargs["device_map"] = options.device_map
        if options.max_memory:
            kwargs["max_memory"] = parse_max_memory(options.max_memory)
        # what fits on no device is offloaded to disk by accelerate: a folder that lives as long as the model
        offload = tempfile.TemporaryDirectory(prefix="deadrelu-offload-")
        kwargs["offload_folder"] = offload.name
    elif options.device != "cpu":
        kwargs["device_map"] = options.device  # straight onto the GPU, shard by shard
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except ImportError as exc:  # device_map needs accelerate
        raise UserError(f"{folder}: {str(exc).splitlines()[0]} ({EXTRA_HINT})") from None
    except pickle.UnpicklingError:  # transformers reads .bin files with torch.load(weights_only=True)
        raise UserError(
            f"{folder}: refused to unpickle its .bin weights: they hold more than tensors (unpickling them "
            "could run code); only a folder of plain weights is read, e.g. re-saved as safetensors where you trust it"
        ) from None
    except (
        OSError,
        ValueError,
        RuntimeError,
        KeyError,
        AttributeError,
        TypeError,
        IndexError,
        NotImplementedError,
    ) as exc:
        # (AttributeError, TypeError, …: a config.json that does not describe the class it names)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder}: transformers could not load the model ({text})") from None
    notes = []
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # filled in at random by transformers (a warning in its log only, which is silenced)
        shown = shown_names(missing)
        notes.append(
            f"check the weights: {len(missing)} tensor(s) of {cls.__name__} are in none of the folder's "
            f"weight files and transformers initialised them at random ({shown}); layers they feed are not "
            "counted on the checkpoint's weights"
        )
    if offload is not None:
        model.deadrelu_offload_folder = offload  # removed with the model (the TemporaryDirectory's finaliser)
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache objects in outputs or exports: a scan is one pass
    float_dtype = str(next((p.dtype for p in model.parameters() if p.is_floating_point()), "float32"))
    from deadrelu_cli.loaders.torch_models import forward_parameters

    required, accepted = forward_parameters(model)
    return LoadedModel(
        path=folder,
        format="hf_folder",
        digest=ThreadPoolExecutor(max_workers=1).submit(folder_sha256, folder),
        backend="torch",
        runnable=model,
        kind="eager",
        inputs=required,
        float_dtype=float_dtype.replace("torch.", ""),
        keyword_inputs=accepted,
        extra={"hf_class": type(model).__name__, "device_map": options.device_map},
        notes=notes,
    )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def tokenizer_ships_code(folder: Path) -> bool:
    """Whether tokenizer_config.json names a tokenizer class in a Python file of the folder (auto_map)."""
    try:
        path = Path(folder) / "tokenizer_config.json"
        document = parse_json(path.read_text(encoding="utf-8"), path)
    except (OSError, ValueError):
        return False  # transformers says what is wrong with it
    return isinstance(document, dict) and bool(document.get("auto_map"))


def load_tokenizer(folder: str | Path, trust_code: bool = False):
    remedy = "save one there (tokenizer.save_pretrained) or pass tokenized --data (input_ids, attention_mask)"
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{folder}: no tokenizer in the folder for --text (none of {', '.join(TOKENIZER_FILES)}); {remedy}"
        )
    check_folder_files(Path(folder))
    if not trust_code and tokenizer_ships_code(Path(folder)):
        raise UserError(
            f"{folder}: the tokenizer's code ships in the folder (auto_map in tokenizer_config.json); pass "
            "--trust-pickle to run it, only if you trust its source, or pass tokenized --data"
        )
    transformers = import_transformers(folder)
    try:
        # trust_remote_code given either way: left None, transformers asks on stdin whether to run the
        # folder's code, and a piped "y" (or anything a CI step feeds stdin) answers it
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_code
        )
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        RecursionError,
    ) as exc:  # (a tokenizer.json nested too deeply)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder}: no usable tokenizer in the folder for --text ({text})") from None
    # transformers may build an empty tokenizer from a config alone: it turns any text into no tokens
    if len(tokenizer) == 0 or not tokenizer("a sample sentence", add_special_tokens=False)["input_ids"]:
        raise UserError(
            f"{folder}: the folder's tokenizer turns text into no tokens (no vocabulary); {remedy}"
        )
    return tokenizer
