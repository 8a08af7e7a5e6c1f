"""Small ONNX graphs built with onnx.helper, and an independent numpy count of their Relu inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, opset=17, name="g"):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def gemm_relu(opset=17, batch=None, bias=None, passthrough=False):
    """x[N,4] -> Gemm(W[8,4], b) -> Relu -> MatMul -> y; b planted with dead units 2, 4, 6.
    passthrough: Identity and Cast(float -> float) between the Gemm and the Relu, an inference-mode
    Dropout (training_mode a constant false) and an Identity between the Relu and the MatMul: the same
    numbers."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 4)) * 0.3).astype(np.float32)
    b = np.array(bias if bias is not None else [0.5, -0.2, -8, 0.1, -10, 0.3, -15, -0.1], np.float32)
    w2 = rng.standard_normal((8, 2)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="out"),
    ]
    inits = [_init("w", w), _init("b", b), _init("w2", w2)]
    if passthrough:
        nodes[1:2] = [
            helper.make_node("Identity", ["h"], ["h_id"], name="id1"),
            helper.make_node("Cast", ["h_id"], ["h_cast"], name="cast", to=F32),
            helper.make_node("Relu", ["h_cast"], ["r0"], name="relu1"),
            helper.make_node("Dropout", ["r0", "ratio", "training"], ["r_drop"], name="drop"),
            helper.make_node("Identity", ["r_drop"], ["r"], name="id2"),
        ]
        inits += [_init("ratio", np.array(0.5, np.float32)), _init("training", np.array(False))]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, [batch, 4])],
        [helper.make_tensor_value_info("y", F32, [batch, 2])],
        inits,
        opset=opset,
    )


def matmul_tokens(opset=17):
    """x[B,T,8] -> MatMul(W[8,6]) + bias -> Relu: units on the last axis."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    b = np.array([0, -40, 0, 0, -40, 0], np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["h"], name="bias"),
        helper.make_node("Relu", ["h"], ["y"], name="ffn_relu"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["B", "T", 8])],
        [helper.make_tensor_value_info("y", F32, ["B", "T", 6])],
        [_init("w", w), _init("b", b)],
        opset=opset,
    )


def conv_relu_hardswish(opset=17, spatial=8, hardswish="scale-first"):
    """Conv -> Relu (a real layer) and a HardSwish decomposition next to it, plus a Clip(0, 6).
    hardswish: "scale-first" x * (Clip(x + 3, 0, 6) / 6) (torch's export), "multiply-first"
    (x * Clip(x + 3, 0, 6)) / 6 (paddle2onnx), "times-a-sixth" (x * Clip(x + 3, 0, 6)) * (1/6)."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32)
    b = np.array([0.1, -30, 0.2, 0.0], np.float32)
    clip_args = ["zero", "six"] if opset >= 11 else []
    clip_attrs = {} if opset >= 11 else {"min": 0.0, "max": 6.0}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["c", "three"], ["c3"], name="hs_add"),
        helper.make_node("Clip", ["c3", *clip_args], ["cl"], name="hs_clip", **clip_attrs),
        *{
            "scale-first": [
                helper.make_node("Div", ["cl", "six"], ["hsig"], name="hs_div"),
                helper.make_node("Mul", ["c", "hsig"], ["hs"], name="hs_mul"),
            ],
            "multiply-first": [
                helper.make_node("Mul", ["c", "cl"], ["xcl"], name="hs_mul"),
                helper.make_node("Div", ["xcl", "six"], ["hs"], name="hs_div"),
            ],
            "times-a-sixth": [
                helper.make_node("Mul", ["cl", "c"], ["xcl"], name="hs_mul"),
                helper.make_node("Mul", ["xcl", "sixth"], ["hs"], name="hs_scale"),
            ],
        }[hardswish],
        helper.make_node("Clip", ["c", *clip_args], ["r6"], name="relu6", **clip_attrs),
        helper.make_node("Add", ["r", "hs"], ["s"], name="sum1"),
        helper.make_node("Add", ["s", "r6"], ["y"], name="sum2"),
    ]
    inits = [
        _init("w", w),
        _init("b", b),
        _init("three", np.float32(3.0)),
        _init("six", np.float32(6.0)),
        _init("sixth", np.float32(1 / 6)),
        _init("zero", np.float32(0.0)),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["N", 3, spatial, spatial])],
        [helper.make_tensor_value_info("y", F32, ["N", 4, spatial, spatial])],
        inits,
        opset=opset,
    )


def paddle_conv_bn(opset=11, weights_in_constants=False, passthrough=False):
    """paddle2onnx's layout: Conv without bias + Add(Reshape(b, [1, C, 1, 1])) -> Relu, then
    Conv -> BatchNormalization (unfused) -> Relu, pooled into a Gemm. Unit 1 of the first Relu and
    unit 2 of the second are dead (bias -40). weights_in_constants: every weight in a Constant node
    instead of an initializer (older paddle2onnx, e.g. PP-OCR's mobile classifier). passthrough: the
    Identity nodes paddle2onnx writes (Conv -> Identity -> Add -> Identity -> Relu), a Dropout after
    the first Relu and a Cast(float -> float) after the BatchNormalization: the same numbers."""
    rng = np.random.default_rng(9)
    w1 = (rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32)
    b1 = np.array([0.1, -40, 0.2, 0.0], np.float32)
    w2 = (rng.standard_normal((5, 4, 3, 3)) * 0.5).astype(np.float32)
    scale = np.array([1.0, 0.5, 2.0, 1.5, 1.0], np.float32)
    shift = np.array([0.1, 0.0, -40, 0.3, 0.2], np.float32)
    mean = (rng.standard_normal(5) * 0.1).astype(np.float32)
    var = (rng.random(5) + 0.5).astype(np.float32)
    wfc = (rng.standard_normal((5, 2)) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["b1", "bias_shape"], ["b1r"], name="bias_reshape"),
        helper.make_node("Add", ["c1", "b1r"], ["p1"], name="bias_add"),
        helper.make_node("Relu", ["p1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "scale", "shift", "mean", "var"], ["p2"], name="bn"),
        helper.make_node("Relu", ["p2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wfc"], ["y"], name="fc"),
    ]
    if passthrough:
        renamed = {"c1": "c1_id", "p1": "p1_id", "r1": "r1_drop", "p2": "p2_cast"}
        for node in nodes:
            if node.op_type != "Reshape" and node.input[0] in renamed:
                node.input[0] = renamed[node.input[0]]
        nodes[1:1] = [helper.make_node("Identity", ["c1"], ["c1_id"], name="id_conv")]
        nodes[4:4] = [helper.make_node("Identity", ["p1"], ["p1_id"], name="id_add")]
        nodes[6:6] = [helper.make_node("Dropout", ["r1"], ["r1_drop"], name="drop", ratio=0.3)]
        nodes[9:9] = [helper.make_node("Cast", ["p2"], ["p2_cast"], name="cast", to=F32)]
    inits = [
        _init("w1", w1),
        _init("b1", b1),
        _init("bias_shape", np.array([1, 4, 1, 1], np.int64)),
        _init("w2", w2),
        _init("scale", scale),
        _init("shift", shift),
        _init("mean", mean),
        _init("var", var),
        _init("wfc", wfc),
    ]
    if weights_in_constants:
        nodes = [
            helper.make_node("Constant", [], [i.name], name=f"const_{i.name}", value=i) for i in inits
        ] + nodes
        inits = []
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", F32, ["N", 2])],
        inits,
        opset=opset,
    )


def relu_in_if():
    """Relu nodes only inside the branches of an If on a boolean input (like silero-vad)."""
    rng = np.random.default_rng(3)
    wa = rng.standard_normal((4, 5)).astype(np.float32)
    ba = np.array([0, 0, -50, 0, 0], np.float32)

    def branch(name, scale):
        nodes = [
            helper.make_node("MatMul", ["x", "wa"], [f"{name}_m"], name=f"{name}_mm"),
            helper.make_node("Add", [f"{name}_m", "ba"], [f"{name}_h"], name=f"{name}_add"),
            helper.make_node("Mul", [f"{name}_h", f"{name}_scale"], [f"{name}_hs"], name=f"{name}_mul"),
            helper.make_node("Relu", [f"{name}_hs"], [f"{name}_out"], name=f"{name}_relu"),
        ]
        g = helper.make_graph(
            nodes,
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", F32, ["N", 5])],
            initializer=[_init(f"{name}_scale", np.float32(scale))],
        )
        return g

    nodes = [
        helper.make_node(
            "If",
            ["flag"],
            ["y"],
            name="gate",
            then_branch=branch("then", 1.0),
            else_branch=branch("else", -1.0),
        )
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("x", F32, ["N", 4]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", F32, ["N", 5])],
        [_init("wa", wa), _init("ba", ba)],
    )


def two_inputs():
    rng = np.random.default_rng(4)
    w1, w2 = rng.standard_normal((3, 6)).astype(np.float32), rng.standard_normal((2, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["a", "w1"], ["p"], name="mm1"),
        helper.make_node("MatMul", ["b", "w2"], ["q"], name="mm2"),
        helper.make_node("Add", ["p", "q"], ["h"], name="add"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("a", F32, ["N", 3]),
            helper.make_tensor_value_info("b", F32, ["N", 2]),
        ],
        [helper.make_tensor_value_info("y", F32, ["N", 6])],
        [_init("w1", w1), _init("w2", w2)],
    )


def float16_model():
    model = gemm_relu()
    fp16 = onnx.ModelProto()
    fp16.CopyFrom(model)
    for init in fp16.graph.initializer:
        arr = numpy_helper.to_array(init).astype(np.float16)
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for value in list(fp16.graph.input) + list(fp16.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(fp16)
    return fp16


def relu_inputs_ground_truth(
    model: onnx.ModelProto, feeds: dict, channel_dims: dict[str, int]
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Run the *un-instrumented* graph with each top-level Relu/Clip input exposed; count in numpy."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    wanted = {n.name: n.input[0] for n in exposed.graph.node if n.name in channel_dims}
    elem_type = exposed.graph.input[0].type.tensor_type.elem_type
    for tensor in wanted.values():
        exposed.graph.output.append(helper.make_tensor_value_info(tensor, elem_type, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    out = {}
    for node_name, tensor in wanted.items():
        a = np.moveaxis(values[tensor].astype(np.float64), channel_dims[node_name], -1)
        a = a.reshape(-1, a.shape[-1])
        out[node_name] = ((a > 0).sum(0), a.max(0), a.shape[0])
    return out


def relu_in_loop(trips=3):
    """h <- Relu(h @ W + b) repeated `trips` times inside a Loop body."""
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((4, 4)) * 0.8).astype(np.float32)
    b = np.array([0.1, -30, 0.2, 0.0], np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w"], ["m"], name="body_mm"),
            helper.make_node("Add", ["m", "b"], ["pre"], name="body_add"),
            helper.make_node("Relu", ["pre"], ["h_out"], name="body_relu"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", F32, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", F32, ["N", 4]),
        ],
    )
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)]
    inits = [_init("w", w), _init("b", b), _init("trips", np.array(trips, np.int64))]
    return (
        _model(
            nodes,
            [helper.make_tensor_value_info("x", F32, ["N", 4])],
            [helper.make_tensor_value_info("y", F32, ["N", 4])],
            inits,
        ),
        w,
        b,
    )


def relu_in_scan(steps=5):
    """A Scan over a [T, N, 4] sequence: h_t = Relu(x_t @ W + b + h_{t-1} @ U); per-step h_t as scan output."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((4, 3)) * 0.7).astype(np.float32)
    u = (rng.standard_normal((3, 3)) * 0.3).astype(np.float32)
    b = np.array([0.1, -40, 0.0], np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w"], ["xw"], name="scan_xw"),
            helper.make_node("MatMul", ["h_prev", "u"], ["hu"], name="scan_hu"),
            helper.make_node("Add", ["xw", "hu"], ["s"], name="scan_sum"),
            helper.make_node("Add", ["s", "b"], ["pre"], name="scan_bias"),
            helper.make_node("Relu", ["pre"], ["h_next"], name="scan_relu"),
            helper.make_node("Identity", ["h_next"], ["y_t"], name="scan_out"),
        ],
        "scan_body",
        [
            helper.make_tensor_value_info("h_prev", F32, ["N", 3]),
            helper.make_tensor_value_info("x_t", F32, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("h_next", F32, ["N", 3]),
            helper.make_tensor_value_info("y_t", F32, ["N", 3]),
        ],
    )
    nodes = [
        helper.make_node("Scan", ["h0", "seq"], ["h_last", "ys"], name="scan", body=body, num_scan_inputs=1)
    ]
    return (
        _model(
            nodes,
            [
                helper.make_tensor_value_info("h0", F32, ["N", 3]),
                helper.make_tensor_value_info("seq", F32, [steps, "N", 4]),
            ],
            [
                helper.make_tensor_value_info("h_last", F32, ["N", 3]),
                helper.make_tensor_value_info("ys", F32, [steps, "N", 3]),
            ],
            [_init("w", w), _init("u", u), _init("b", b)],
        ),
        w,
        u,
        b,
    )


def stored_tensors(path) -> dict[str, np.ndarray]:
    """Every weight an ONNX file stores, by name: its initializers and its Constant nodes' values."""
    graph = onnx.load(str(path)).graph
    found = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def token_sites(
    mask_input: bool = True, opset: int = 17, vocab: int = 12, pad: int = 1, pad_value: float = 3.0
):
    """A token model: input_ids[B,T] (and attention_mask[B,T], multiplied into the embeddings when
    `mask_input`) -> Gather -> four Relu sites, one per layout of the tokens:
    rows_relu [B,T,6] (MatMul), flat_relu [B*T,5] (Reshape + MatMul), conv_relu [B,4,T] (a k=1 Conv1d,
    units before the tokens) and pooled_relu [B,3] (a mean over T: not the mask's positions). The
    padding id's embedding (`pad_value`) is planted far from the others, and unit 0 of rows_relu fires on
    it only."""
    rng = np.random.default_rng(3)
    d = 8
    emb = (rng.standard_normal((vocab, d)) * 0.5).astype(np.float32)
    emb[pad] = pad_value
    w1 = (rng.standard_normal((d, 6)) * 0.5).astype(np.float32)
    w1[:, 0] = 1.0  # unit 0: the embedding summed, 12 or 24 on padding, well below 8 elsewhere
    b1 = np.array([-8, 0, -50, 0.1, 0, 0], np.float32)  # unit 2 dead everywhere
    w2 = (rng.standard_normal((6, 5)) * 0.5).astype(np.float32)
    b2 = np.array([0, -0.5, 0, -60, 0.2], np.float32)
    w3 = (rng.standard_normal((4, d, 1)) * 0.5).astype(np.float32)
    b3 = np.array([0.1, -40, 0, -0.3], np.float32)
    w4 = (rng.standard_normal((3, 6)) * 0.5).astype(np.float32)
    b4 = np.array([0.0, -30, 0.5], np.float32)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e0"], name="embed")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])]
    if mask_input:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]))
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mf"], name="mask_cast", to=F32),
            helper.make_node("Unsqueeze", ["mf", "axis2"], ["m3"], name="mask_unsq"),
            # padding keeps a scaled embedding: the model sees it, as a real attention model does
            helper.make_node("Add", ["m3", "half"], ["m3h"], name="mask_half"),
            helper.make_node("Mul", ["e0", "m3h"], ["e"], name="mask_mul"),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["e0"], ["e"], name="noop"))
    nodes += [
        helper.make_node("MatMul", ["e", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="rows_relu"),
        helper.make_node("Reshape", ["r1", "flat_shape"], ["r1f"], name="flatten"),
        helper.make_node("MatMul", ["r1f", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["a2"], name="fc2_bias"),
        helper.make_node("Relu", ["a2"], ["r2"], name="flat_relu"),
        helper.make_node("Transpose", ["e"], ["et"], name="to_nct", perm=[0, 2, 1]),
        helper.make_node("Conv", ["et", "w3", "b3"], ["c3"], name="conv"),
        helper.make_node("Relu", ["c3"], ["r3"], name="conv_relu"),
        helper.make_node("ReduceMean", ["r1"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "w4", "b4"], ["h4"], name="head", transB=1),
        helper.make_node("Relu", ["h4"], ["r4"], name="pooled_relu"),
    ]
    inits = [
        _init("emb", emb),
        _init("w1", w1),
        _init("b1", b1),
        _init("w2", w2),
        _init("b2", b2),
        _init("w3", w3),
        _init("b3", b3),
        _init("w4", w4),
        _init("b4", b4),
        _init("flat_shape", np.array([-1, 6], np.int64)),
        _init("axis2", np.array([2], np.int64)),
        _init("half", np.array(0.5, np.float32)),
    ]
    outputs = [
        helper.make_tensor_value_info("r2", F32, ["BT", 5]),
        helper.make_tensor_value_info("r3", F32, ["B", 4, "T"]),
        helper.make_tensor_value_info("r4", F32, ["B", 3]),
    ]
    return _model(nodes, inputs, outputs, inits, opset=opset)
