"""data42: NaN/Inf under --allow-nonfinite in every format, the model hash of ONNX external data,
merge's data fingerprint (overlapping scans refused, identical statistics of disjoint data merged).
Truth from numpy, onnxruntime and hashlib in the test."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
from onnx_graphs import gemm_relu


def test_onnx_external_data_is_in_the_model_hash(tmp_path, cli):
    """Changing the weights file of an ONNX model saved with external data changes the report's hash;
    a self-contained model's hash stays the sha256 of its file."""
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(gemm_relu(), folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    onnx.save(gemm_relu(), tmp_path / "plain.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((4, 4), np.float32))

    def sha(model) -> str:
        result = cli("scan", model, "--data", tmp_path / "x.npz", "--json", "-", "-q")
        assert result.code == 0, result.err
        return result.json()["model"]["sha256"]

    before = sha(folder / "m.onnx")
    data = bytearray((folder / "m.data").read_bytes())
    data[0] ^= 1  # the first weight, one bit
    (folder / "m.data").write_bytes(bytes(data))
    after = sha(folder / "m.onnx")
    assert before != after
    assert after != hashlib.sha256((folder / "m.onnx").read_bytes()).hexdigest()
    assert sha(tmp_path / "plain.onnx") == hashlib.sha256((tmp_path / "plain.onnx").read_bytes()).hexdigest()
