"""`--text FILE`: documents tokenized with the model folder's own tokenizer into calibration data.

Plain text holds one document per line (empty lines skipped); `.jsonl` holds one JSON object per line,
the document under `--text-field` (default "text"). Documents are truncated to `--seq-len` tokens and
padded to the longest one (the tokenizer's padding side); the attention_mask that comes with them is
the position mask of the scan, so padding never counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deadrelu_cli.calibration import CalibrationData, InMemorySource
from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.detect import check_readable_file


def read_documents(path: str, field: str) -> list[str]:
    p = check_readable_file(path, "text")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        return [line for line in lines if line.strip()]
    documents = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}:{number}: no string field {field!r} (found: {keys}); pass --text-field")
        documents.append(record[field])
    return documents


def tokenized_data(path: str, folder: str, field: str = "text", seq_len: int = 128) -> CalibrationData:
    from deadrelu_cli.loaders.hf_folder import load_tokenizer

    if seq_len < 1:
        raise UserError("--seq-len must be at least 1")
    documents = read_documents(path, field)
    if not documents:
        raise UserError(f"{path}: no documents (one per line, or JSONL with --text-field)")
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"{folder}: the tokenizer has no pad, eos or unk token to pad documents with")
        tokenizer.pad_token = fallback  # the attention_mask drops these positions anyway
    encoded = tokenizer(
        documents, padding="longest", truncation=True, max_length=seq_len, return_tensors="np"
    )
    wanted = [
        name
        for name in getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"])
        if name in encoded
    ]
    sources = [InMemorySource(name, np.ascontiguousarray(encoded[name]).astype(np.int64)) for name in wanted]
    return CalibrationData(path=str(Path(path)), sources=sources).configure()
