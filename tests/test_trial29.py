"""trial29: files from strangers, as a security reviewer sees them. Each test builds its hostile input
here and computes the truth independently (numpy on the bytes that should have been read)."""

from __future__ import annotations

import json

import numpy as np
import pytest

# --- ONNX: every stored tensor's external data is confined to the model's folder ------------------


def _leaky_onnx(folder, variant: str, location: str) -> np.ndarray:
    """A graph that adds 16 bytes read from external data `location` to its input before a Relu: the
    report's max pre-activation per unit then *is* those bytes. The tensor sits where onnx's own
    external-data loader does not look: a sparse Constant, a sparse initializer, or a Constant inside a
    model-local function."""
    from onnx import TensorProto, helper, numpy_helper

    values = TensorProto(name="v", data_type=TensorProto.UINT8, dims=[16])
    values.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = values.external_data.add()
        entry.key, entry.value = key, value
    sparse = helper.make_sparse_tensor(
        values, numpy_helper.from_array(np.arange(16, dtype=np.int64), "i"), [16]
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    relu = helper.make_node("Relu", ["s"], ["y"], name="relu")
    opsets = [helper.make_opsetid("", 17)]
    functions = []
    if variant == "function":
        body = [
            helper.make_node("Constant", [], ["c"], value=values),
            helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["X", "cf"], ["Y"]),
        ]
        functions = [helper.make_function("local", "f", ["X"], ["Y"], body, opsets)]
        nodes = [helper.make_node("f", ["x"], ["s"], domain="local"), relu]
        opsets = [*opsets, helper.make_opsetid("local", 1)]
        graph = helper.make_graph(nodes, "g", [x], [y])
    else:
        head = (
            []
            if variant == "sparse_initializer"
            else [helper.make_node("Constant", [], ["v"], sparse_value=sparse)]
        )
        nodes = [
            *head,
            helper.make_node("Cast", ["v"], ["cf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "cf"], ["s"]),
            relu,
        ]
        extra = [sparse] if variant == "sparse_initializer" else []
        graph = helper.make_graph(nodes, "g", [x], [y], sparse_initializer=extra)
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 8
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    np.savez(folder / "zeros.npz", x=np.zeros((3, 16), np.float32))
    return np.zeros((3, 16), np.float32)


@pytest.mark.parametrize("variant", ["sparse_constant", "sparse_initializer", "function"])
def test_onnx_external_data_outside_the_model_folder_is_never_read(cli, tmp_path, monkeypatch, variant):
    """onnxruntime resolves external data of a model given as bytes against the *current directory*:
    a tensor that deadrelu's own loader skipped leaked a file of the CI checkout (.env, .git/config)
    byte for byte into the report's max_preactivation."""
    work, model_dir = tmp_path / "checkout", tmp_path / "model"
    work.mkdir()
    model_dir.mkdir()
    (work / "dotenv").write_bytes(b"AWS_SECRET=ABCDEFGHIJKLMNOP\n")
    monkeypatch.chdir(work)
    x = _leaky_onnx(model_dir, variant, "dotenv")
    out = tmp_path / "r.json"
    result = cli("scan", model_dir / "model.onnx", "--data", model_dir / "zeros.npz", "--json", out, "-q")
    assert result.code == 2, result.err
    assert not out.exists()
    assert result.err.count("\n") == 1 and "dotenv" in result.err and "Traceback" not in result.err

    # the same file name inside the model's folder is the model's own data: read from there, not the cwd
    own = bytes(range(40, 56))
    (model_dir / "dotenv").write_bytes(own)
    result = cli("scan", model_dir / "model.onnx", "--data", model_dir / "zeros.npz", "--json", out, "-q")
    assert result.code == 0, result.err
    (layer,) = json.loads(out.read_text())["layers"]
    pre = x + np.frombuffer(own, np.uint8).astype(np.float32)
    assert layer["max_preactivation"] == pre.max(axis=0).tolist()
    assert layer["positive_counts"] == (pre > 0).sum(axis=0).tolist()
