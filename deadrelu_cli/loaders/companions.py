"""Files a model's load (or fix) reads besides the model file itself, for the output guard
(`files.guard_outputs`): a `--json`/`--output` landing on one of them would destroy the user's model.

* an ONNX model's external data files (`weights.bin` beside `model.onnx`);
* the optimizer state a training checkpoint's fix reads beside it (the Hugging Face Trainer's
  `optimizer.pt`, accelerate's `optimizer.bin`).

A model folder needs none of this: the guard already compares every file inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

HF_OPTIMIZER_FILE = "optimizer.pt"
# optimizer files saved beside the weights: the Hugging Face Trainer's, accelerate's `save_state`
OPTIMIZER_FILES = (HF_OPTIMIZER_FILE, "optimizer.bin")


def external_data_files(path: Path) -> list[Path]:
    """The files an ONNX model's tensors name as their external data (as locations relative to its
    folder; where they really point is the loader's business, `onnx_model._check_external_locations`).
    A file that does not parse as ONNX has none here: the loader says what is wrong with it."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1)
    except OSError:
        return []
    if path.suffix.lower() != ".onnx" and head != b"\x08":
        return []
    import mmap

    try:  # every external tensor names its file under the key "location", stored as these very bytes
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            if view.find(b"location") < 0:
                return []  # no external data: not worth parsing every weight (0.7 s per 100 MB)
    except (OSError, ValueError):  # (an empty file: mmap refuses it)
        return []
    import onnx
    from onnx import TensorProto

    from deadrelu_cli.loaders.onnx_model import stored_tensors

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure: the loader reports it with its own message
        return []
    files = []
    for tensor in stored_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and "\0" not in location:
                files.append(path.parent / location)
    return sorted(set(files))


def _may_be_external_data(path: Path, outputs: Sequence[tuple[str, object]]) -> bool:
    """Whether an output could be one of the model's external data files, from stat alone: only a file
    that exists already can be (a missing one fails the load with nothing lost), and only one inside the
    model's folder (where the loader confines external data) or a hard link (another name of such a
    file). Parsing the model to find its data files (0.7 s per 100 MB) is paid only then."""
    folder = path.parent.resolve()
    for _, value in outputs:
        if not value or str(value) == "-":
            continue
        out = Path(str(value))
        try:
            info = out.stat()
            inside = out.resolve().is_relative_to(folder)
        except (OSError, ValueError):
            continue
        if out.is_file() and (inside or info.st_nlink > 1):
            return True
    return False


def model_companions(
    model: str | Path | None, outputs: Sequence[tuple[str, object]]
) -> list[tuple[str, Path]]:
    """(label, path) input roles for `guard_outputs` of OUTPUTS: what MODEL's load or fix reads beside it."""
    if not model:
        return []
    path = Path(model)
    try:
        if not path.is_file():
            return []  # a folder is compared file by file already; a missing model is the loader's to say
    except OSError:
        return []
    roles = [("the optimizer state beside MODEL", path.parent / name) for name in OPTIMIZER_FILES]
    if _may_be_external_data(path, outputs):
        roles += [("MODEL's external data", file) for file in external_data_files(path)]
    return [(label, file) for label, file in roles if file.exists() and file != path]
