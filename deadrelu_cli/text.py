"""`--text FILE`: documents tokenized with the model folder's own tokenizer into calibration data.

Plain text holds one document per line (empty lines skipped); `.jsonl` holds one JSON object per line,
the document under `--text-field` (default "text"); a `.json` file holds one such object per line, one
array of objects or strings, or a single object. Two layouts (`--text-packing`):

* pad (default): one document per sample, truncated to `--seq-len` tokens and padded to the longest one
  (the tokenizer's padding side).
* pack: every document tokenized whole (the tokenizer's own special tokens, e.g. a BOS per document),
  joined into one stream with the EOS token (SEP when there is no EOS) between documents — unless the
  boundary already holds it, as with OPT's `</s>` that starts every document — and cut into blocks of
  `--seq-len` tokens; only the last block is partial, padded like the pad layout. Every position of a
  full block is a real token, and attention runs across document boundaries within a block, as in
  packed pretraining.

Either way the samples come with an attention_mask, whatever the tokenizer's `model_input_names`
declare, padded on the right whatever its `padding_side`: the mask is the position mask of the scan,
so padding never counts (also where the EOS pads and only the mask tells it from a real EOS), and it
goes to forward() where forward() takes it, as token_type_ids do (`inputs.unfed_arrays`). `--exclude-token-ids` drops BOS
(or separator) positions wherever they are in a block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deadrelu_cli.calibration import CalibrationData, InMemorySource
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import parse_json
from deadrelu_cli.loaders.detect import check_readable_file
from deadrelu_cli.report.fingerprint import document_digests


def read_documents(path: str, field: str) -> list[str]:
    p = check_readable_file(path, "text")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first document
        content = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # a line ends at "\n" (or "\r\n") only: str.splitlines would also cut at U+2028, form feeds and
    # other separators that a document (or a JSON string written with ensure_ascii=False) may hold
    lines = [line[:-1] if line.endswith("\r") else line for line in content.split("\n")]
    suffix = p.suffix.lower()
    if suffix == ".json":
        whole = _json_whole(content, path)  # one array (or one object), else JSON lines
        if isinstance(whole, list):
            return _json_array_documents(path, whole, field)
        if isinstance(whole, dict):
            return [_document(path, str(path), whole, field)]
    if suffix not in (".jsonl", ".ndjson", ".json"):
        return [line for line in lines if line.strip()]
    documents = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{path}:{number}")
        except ValueError as exc:
            raise UserError(f"{path}:{number}: not a JSON object ({exc})") from None
        documents.append(_document(path, f"{path}:{number}", record, field))
    return documents


def _document(path: str, where: str, record, field: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{where}: no string field {field!r} (found: {keys}); pass --text-field")
    return record[field]


def _json_whole(content: str, path: str):
    """The value of a .json file read whole; None when it is not one JSON value (JSON lines)."""
    try:
        return parse_json(content, path)
    except ValueError:
        return None


def _json_array_documents(path: str, records: list, field: str) -> list[str]:
    """A .json file holding one array: of strings (one document each) or of objects (--text-field)."""
    return [
        record if isinstance(record, str) else _document(path, f"{path}: item {index}", record, field)
        for index, record in enumerate(records)
    ]


PACKINGS = ("pad", "pack")


def packed_blocks(documents: list[list[int]], separator: int, seq_len: int) -> list[list[int]]:
    """Token id lists joined into one stream (SEPARATOR between two documents unless one of them already
    has it at the boundary), cut into blocks of SEQ_LEN; the last one may be shorter."""
    stream, _ = _packed_stream(documents, separator)
    return [stream[start : start + seq_len] for start in range(0, len(stream), seq_len)]


def _packed_stream(documents: list[list[int]], separator: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The joined stream, and where each document lies in it ([start, end) of its own tokens)."""
    stream: list[int] = []
    spans = []
    for ids in documents:
        if stream and ids and stream[-1] != separator and ids[0] != separator:
            stream.append(separator)
        spans.append((len(stream), len(stream) + len(ids)))
        stream.extend(ids)
    return stream, spans


def block_documents(documents: list[list[int]], separator: int, seq_len: int) -> list[np.ndarray]:
    """Per block of packed_blocks, the digests of the documents with a token in it: what stands for
    the block in the report's data fingerprint. A block is a cut of the stream at multiples of SEQ_LEN,
    so the same document lands in other blocks when a file holds one more document before it; its
    digest does not (merge's overlap check would miss a document scanned twice in two files, or refuse
    two files of other documents whose blocks happen to match)."""
    stream, spans = _packed_stream(documents, separator)
    found: list[list[int]] = [[] for _ in range(-(-len(stream) // seq_len))]
    for digest, (start, end) in zip(document_digests(documents), spans, strict=True):
        for block in range(start // seq_len, -(-end // seq_len)):  # none for an empty document
            found[block].append(int(digest))
    return [np.array(d, dtype=np.uint64) for d in found]


def separator_id(tokenizer, folder: str) -> int:
    for name in ("eos_token_id", "sep_token_id"):
        found = getattr(tokenizer, name, None)
        if isinstance(found, int):
            return found
    raise UserError(
        f"{folder}: the tokenizer has no EOS or SEP token to join documents with for --text-packing pack; "
        "use --text-packing pad"
    )


def tokenized_data(
    path: str,
    folder: str,
    field: str = "text",
    seq_len: int = 128,
    packing: str = "pad",
    trust_code: bool = False,
) -> tuple[CalibrationData, dict]:
    """The calibration data, and what the report records of it (`data.text`)."""
    from deadrelu_cli.loaders.hf_folder import load_tokenizer

    if seq_len < 1:
        raise UserError("--seq-len must be at least 1")
    if packing not in PACKINGS:
        raise UserError(f"--text-packing {packing!r}: choose pad or pack")
    documents = read_documents(path, field)
    if not documents:
        raise UserError(f"{path}: no documents (one per line, or JSONL with --text-field)")
    tokenizer = load_tokenizer(folder, trust_code)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"{folder}: the tokenizer has no pad, eos or unk token to pad documents with")
        tokenizer.pad_token = fallback  # the attention_mask drops these positions anyway
    # right padding whatever the tokenizer's side (often "left", for generation): each real token keeps
    # the position it has unpadded (BERT and GPT-2 count absolute positions from the left, and not every
    # model derives them from the mask), and a causal model's real tokens never see the padding
    tokenizer.padding_side = "right"
    info = {"packing": packing, "seq_len": seq_len, "documents": len(documents)}
    if packing == "pack":
        separator = separator_id(tokenizer, folder)
        whole = tokenizer(documents, truncation=False)["input_ids"]  # no truncation: blocks cut the stream
        blocks = packed_blocks(whole, separator, seq_len)
        encoded = tokenizer.pad(
            {"input_ids": blocks}, padding="longest", return_attention_mask=True, return_tensors="np"
        )
        wanted = ["input_ids", "attention_mask"]  # the mask marks the last block's padding
        info["separator_token_id"] = separator
        stand_ins = block_documents(whole, separator, seq_len)
    else:
        stand_ins = None  # each sample is one document: its own digest
        # the attention_mask whatever `model_input_names` declares (["input_ids"], ["input_ids",
        # "token_type_ids"]): it is the position mask, and only it tells padding from a real token when
        # the EOS pads; the scan feeds it to forward() only where forward() takes it
        encoded = tokenizer(
            documents,
            padding="longest",
            truncation=True,
            max_length=seq_len,
            return_attention_mask=True,
            return_tensors="np",
        )
        # documents cut at seq_len (their later tokens are not counted): said in the report, never silent
        whole = tokenizer(documents, truncation=False, return_attention_mask=False)["input_ids"]
        info["truncated"] = sum(len(ids) > seq_len for ids in whole)
        declared = getattr(tokenizer, "model_input_names", None) or []
        wanted = (
            ["input_ids"]
            + [name for name in declared if name in encoded and name not in ("input_ids", "attention_mask")]
            + ["attention_mask"]
        )
    sources = [InMemorySource(name, np.ascontiguousarray(encoded[name]).astype(np.int64)) for name in wanted]
    data = CalibrationData(path=str(Path(path)), sources=sources, sample_digests=stand_ins).configure()
    data.optional = tuple(name for name in wanted if name != "input_ids")  # fed where forward() takes them
    return data, info
