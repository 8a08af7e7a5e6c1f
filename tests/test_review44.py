"""Review of round 43 (review44): silent wrong answers found by a hostile reading, each checked against
truth the test builds itself (the data's construction, numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hf_models import opt_model, save_folder, save_tokenizer

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def packed_opt(tmp_path_factory):
    """A tiny OPT folder whose tokenizer has an EOS to join documents with (--text-packing pack)."""
    folder = save_folder(opt_model(), tmp_path_factory.mktemp("opt44") / "opt")
    save_tokenizer(folder, eos_token="[BOS]")
    return folder


def _documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, 29, int(rng.integers(3, 9)))) for _ in range(count)]


def _packed_scan(cli, folder, path, documents, out):
    path.write_text("".join(d + "\n" for d in documents))
    result = cli("scan", folder, "--text", path, "--text-packing", "pack", "--seq-len", "5", "--json", out)
    assert result.code == 0, result.err


def test_merge_of_packed_text_finds_documents_shared_wherever_the_stream_was_cut(packed_opt, cli, tmp_path):
    """Two --text-packing pack scans of files that share documents 1-5 (one file starts a document
    later): the shared documents' tokens are in both parts, but each stream is cut into other blocks, so
    a fingerprint of blocks shares nothing and merge summed them twice, silently. The fingerprint of a
    packed scan is of its documents: merge refuses, naming the shared count the test built."""
    docs = _documents(7, seed=3)
    assert len(set(docs)) == len(docs)
    _packed_scan(cli, packed_opt, tmp_path / "a.txt", docs[:6], tmp_path / "a.json")
    _packed_scan(cli, packed_opt, tmp_path / "b.txt", docs[1:], tmp_path / "b.json")
    merged = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "--json", tmp_path / "ab.json")
    assert merged.code == 2, merged.err
    assert "5 of the same documents" in merged.err and "--allow-overlap" in merged.err


def test_merge_of_packed_text_takes_disjoint_documents(packed_opt, cli, tmp_path):
    """Disjoint document files merge, whatever their blocks hold; the union's fingerprint is of every
    document, and a later part with one of them is refused against the merged report."""
    docs = _documents(8, seed=4)
    assert len(set(docs)) == len(docs)
    _packed_scan(cli, packed_opt, tmp_path / "a.txt", docs[:4], tmp_path / "a.json")
    _packed_scan(cli, packed_opt, tmp_path / "b.txt", docs[4:7], tmp_path / "b.json")
    _packed_scan(cli, packed_opt, tmp_path / "c.txt", [docs[7], docs[2]], tmp_path / "c.json")
    merged = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "--json", tmp_path / "ab.json")
    assert merged.code == 0, merged.err
    again = cli("merge", tmp_path / "ab.json", tmp_path / "c.json", "--json", tmp_path / "abc.json")
    assert again.code == 2 and "1 of the same documents" in again.err, again.err
