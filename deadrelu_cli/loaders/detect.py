"""Tell checkpoint formats apart by their content (the extension is only a hint)."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

from deadrelu_cli.errors import UserError
from deadrelu_cli.files import check_regular_file, parse_json

TORCH_ZIP = "torch_zip"  # torch.save archive: a state_dict, a checkpoint dict, or a pickled module
TORCH_LEGACY = "torch_legacy"  # pre-1.6 torch.save (a raw pickle stream)
HF_FOLDER = "hf_folder"  # a Hugging Face model folder (config.json + weights)


def check_readable_file(path: str | Path, what: str = "model") -> Path:
    p = check_regular_file(path, what)  # from stat alone: a FIFO or a device would block the open below
    try:
        with open(p, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if p.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    return p


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def refuse_ambiguous_names(path: Path, names: list[str]) -> None:
    """Two members of one name, or of names that differ only in case: Python's zipfile reads the last of
    them, torch's reader (miniz, case-insensitive) may read another, so what was checked (the code
    allowlist, the CRCs) need not be what runs. Such an archive is refused."""
    seen: dict[str, str] = {}
    for name in names:
        key = name.casefold()
        if key in seen:
            same = "twice" if seen[key] == name else f"as {seen[key]!r} and {name!r}"
            raise UserError(
                f"{path}: archive member {name!r} is stored {same}; readers disagree on which one they read, "
                "refusing the archive"
            )
        seen[key] = name


def check_torch_file(path: Path) -> None:
    """What every torch.load of a file from outside goes through first: a zip archive (torch.save's
    format) is checked as `check_archive` says (torch's reader neither checks CRCs nor bounds what a
    compressed member expands to); a legacy pickle stream is left to torch (its sizes are checked there)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"PK":
        check_archive(path)


def check_archive(path: Path, max_ratio: int = 2000, data: bytes | None = None) -> list[str]:
    """Look at a zip archive (torch.save, TorchScript, .pt2) before any loader touches it: readable
    central directory, member names inside the archive, and no zip bomb (a member that would expand
    past the memory available, or more than `max_ratio` times its compressed size). `data`: the
    archive's bytes (an archive inside another one), PATH then only names it in messages."""
    import io

    from deadrelu_cli.memory import available_memory

    source = io.BytesIO(data) if data is not None else path
    try:
        with zipfile.ZipFile(source) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UserError(
            f"{path}: a damaged zip archive ({exc}); the checkpoint is truncated or corrupted"
        ) from None
    refuse_ambiguous_names(path, [info.filename for info in infos])
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith(("/", "\\")) or ".." in Path(name).parts:
            raise UserError(
                f"{path}: archive member {name!r} points outside the archive; refusing to load it"
            )
        total += info.file_size
        if (
            info.compress_size
            and info.file_size > max_ratio * info.compress_size
            and info.file_size > (64 << 20)
        ):
            raise UserError(
                f"{path}: archive member {name!r} expands {info.file_size // max(1, info.compress_size)}x; "
                "refusing a likely zip bomb"
            )
    if total > available_memory():
        raise UserError(
            f"{path}: the archive expands to {total / 2**30:.1f} GiB, more than the memory available"
        )
    _check_crcs(path, source)
    return [info.filename for info in infos]


def _check_crcs(path: Path, source, chunk: int = 1 << 20) -> None:
    """Read every member once, streaming, so that zipfile checks its CRC-32: torch's own zip reader does
    not, and a flipped byte in a tensor record would load as a different weight without a word."""
    try:
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    while member.read(chunk):
                        pass
    except (
        zipfile.BadZipFile,
        zlib.error,
        OSError,
        ValueError,
        EOFError,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        # (RuntimeError: a member flagged as encrypted)
        raise UserError(
            f"{path}: a damaged zip archive ({exc}); the checkpoint is truncated or corrupted"
        ) from None


def detect_format(path: str | Path) -> str:
    """One of: hf_folder, torch_zip, torch_legacy, torchscript, exported_program, safetensors, onnx."""
    if Path(path).is_dir():
        if (Path(path) / "config.json").is_file():
            return HF_FOLDER
        raise UserError(
            f"{path}: is a directory without config.json; give a model file, or a Hugging Face model folder "
            "(config.json + model.safetensors, as save_pretrained writes it)"
        )
    p = check_readable_file(path)
    size = p.stat().st_size
    with open(p, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK"):
        names = check_archive(p)
        if any(
            name.endswith("serialized_exported_program.json") or "/models/" in name and name.endswith(".json")
            for name in names
        ):
            return "exported_program"
        if any("/code/" in name.lower() or name.lower().endswith("constants.pkl") for name in names):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in names):
            return TORCH_ZIP
        raise UserError(
            f"{path}: a zip archive that is neither a torch.save checkpoint, TorchScript nor a .pt2 ExportedProgram"
        )
    if head[:1] == b"\x80" and p.suffix.lower() not in (".onnx",):
        return TORCH_LEGACY
    if _looks_like_safetensors(head, size):
        return "safetensors"
    if p.suffix.lower() == ".onnx" or head[:1] == b"\x08":
        return "onnx"
    if p.suffix.lower() == ".safetensors":
        raise UserError(
            f"{path}: not a valid safetensors file (bad header); the file is truncated or not safetensors"
        )
    try:
        document = parse_json(p.read_bytes()[: 1 << 23], p)  # an LLM's weight index runs past 64 KiB
        kind = "a JSON file"
    except (ValueError, UnicodeDecodeError):
        document, kind = None, "an unknown format"
    if isinstance(document, dict) and isinstance(document.get("weight_map"), dict):
        raise UserError(
            f"{path}: the index of sharded weights, not a model; scan the folder that holds it with its "
            "config.json (a Hugging Face model folder), or save the weights as one .safetensors/.pt for --arch"
        )
    raise UserError(
        f"{path}: {kind}, not a model; deadrelu reads torch.save checkpoints (.pt/.pth/.bin), safetensors, "
        "TorchScript, torch.export (.pt2) and ONNX files"
    )
