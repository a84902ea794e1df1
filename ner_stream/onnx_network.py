"""The BiLSTM and the projection of a tagger run by ONNX Runtime, an optional CPU backend.

The network's embeddings and character encoder stay in torch (a lookup and, for the CNN, one
matrix product over the distinct words of a micro-batch); what takes most of a pass on a CPU,
the BiLSTM, and the projection to tag scores run in an ONNX Runtime session built from the
model's weights. The graph is written here with `onnx.helper` rather than by torch's exporter:
it is four operators, and the exporter's API and output have changed from one torch release to
the next. Only fp32 on the CPU, for a bidirectional LSTM (the `bilstm-crf` architecture).

Padding: the ONNX LSTM operator takes each row's length (`sequence_lens`), so the backward
direction starts at the row's last real token, as `NerModel._bilstm_packed` does; the scores of
padded positions differ from torch's and are masked by the CRF either way.

Source: ONNX operator specification, LSTM (opset 14), https://onnx.ai/onnx/operators/onnx__LSTM.html
(gate order i, o, f, c; torch's is i, f, g, o).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ner_stream.model import NerModel
from ner_stream.precision import BACKENDS

OPSET = 17
INSTALL_HINT = "install it with: pip install 'ner-stream[onnx]'"


class BackendUnavailable(ValueError):
    """The ONNX backend was asked for but cannot run (onnxruntime missing, or this model)."""


def onnx_runtime_missing() -> str | None:
    """Why onnxruntime and onnx cannot be imported, None when both can."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return (
            f"the onnx backend needs the onnxruntime and onnx packages ({e.name} is missing): "
            + INSTALL_HINT
        )
    return None


def unsupported(model: NerModel, device: torch.device, precision: str) -> str | None:
    """Why this model cannot run on the ONNX backend here, None when it can."""
    c = model.config
    if device.type != "cpu":
        return f"the onnx backend runs on the CPU only, not {device.type}"
    if precision != "fp32":
        return f"the onnx backend runs fp32 only, not {precision}"
    if not c.bidirectional or c.arch != "bilstm-crf":
        return "the onnx backend runs bidirectional LSTM-CRF models only"
    return None


def choose_backend(
    backend: str, model: NerModel, device: torch.device, precision: str
) -> tuple[str, str]:
    """The backend to run (`torch` or `onnx`) and why, for `backend` one of `BACKENDS`.

    Raises `BackendUnavailable` with one sentence when `onnx` is asked for and cannot run, and
    ValueError for an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch", "asked for"
    why = unsupported(model, device, precision) or onnx_runtime_missing()
    if backend == "onnx":
        if why:
            raise BackendUnavailable(why)
        return "onnx", "asked for"
    return ("torch", why) if why else ("onnx", "onnxruntime is installed")


def _gates(w: Tensor) -> np.ndarray:
    """torch's gate blocks (i, f, g, o) along dim 0, reordered to ONNX's (i, o, f, c)."""
    i, f, g, o = w.detach().float().chunk(4, 0)
    return torch.cat([i, o, f, g]).numpy()


def build_graph(model: NerModel) -> bytes:
    """The serialized ONNX model of `model`'s BiLSTM layers and projection.

    Inputs: ``x`` float32 [B, T, D] (the concatenated embeddings and features, as
    `NerModel.emissions` feeds its LSTM) and ``lengths`` int32 [B]; output ``scores`` float32
    [B, T, K]. Raises ImportError when the onnx package is missing.
    """
    from onnx import TensorProto, helper, numpy_helper

    lstm = model.lstm
    hidden = lstm.hidden_size
    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    const("flat_shape", np.array([0, 0, -1], dtype=np.int64))
    nodes.append(helper.make_node("Transpose", ["x"], ["x0"], perm=[1, 0, 2]))  # [T, B, D]
    current = "x0"
    for layer in range(lstm.num_layers):
        w, r, b = [], [], []
        for suffix in (f"_l{layer}", f"_l{layer}_reverse"):
            w.append(_gates(getattr(lstm, "weight_ih" + suffix)))
            r.append(_gates(getattr(lstm, "weight_hh" + suffix)))
            b.append(
                np.concatenate(
                    [
                        _gates(getattr(lstm, "bias_ih" + suffix)),
                        _gates(getattr(lstm, "bias_hh" + suffix)),
                    ]
                )  # fmt: skip
            )
        names = [const(f"{n}{layer}", np.stack(v)) for n, v in (("W", w), ("R", r), ("B", b))]
        y = f"y{layer}"
        nodes.append(
            helper.make_node(
                "LSTM",
                [current, *names, "lengths"],
                [y],
                direction="bidirectional",
                hidden_size=hidden,
            )  # fmt: skip
        )
        # Y is [T, 2, B, H]: both directions side by side per token, as torch's output.
        nodes.append(helper.make_node("Transpose", [y], [f"{y}t"], perm=[0, 2, 1, 3]))
        current = f"h{layer}"
        nodes.append(helper.make_node("Reshape", [f"{y}t", "flat_shape"], [current]))
    nodes.append(helper.make_node("Transpose", [current], ["h"], perm=[1, 0, 2]))  # [B, T, 2H]
    proj_w = const("proj_w", model.proj.weight.detach().float().t().contiguous().numpy())
    proj_b = const("proj_b", model.proj.bias.detach().float().numpy())
    nodes.append(helper.make_node("MatMul", ["h", proj_w], ["logits"]))
    nodes.append(helper.make_node("Add", ["logits", proj_b], ["scores"]))
    d_in = lstm.input_size
    graph = helper.make_graph(
        nodes,
        "ner_stream_bilstm",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", d_in]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, ["B"]),
        ],
        [
            helper.make_tensor_value_info(
                "scores", TensorProto.FLOAT, ["B", "T", model.proj.out_features]
            )
        ],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return onnx_model.SerializeToString()


class OnnxNetwork:
    """An ONNX Runtime session running `model`'s BiLSTM and projection (see `build_graph`).

    `threads`: intra-op threads (the model's torch threads); the session's threads do not spin
    while idle, so that they leave the core to the CRF and the consuming side. Raises
    `BackendUnavailable` when onnxruntime or onnx is missing.
    """

    def __init__(self, model: NerModel, threads: int) -> None:
        missing = onnx_runtime_missing()
        if missing:
            raise BackendUnavailable(missing)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.num_tags = model.proj.out_features
        self.session = ort.InferenceSession(
            build_graph(model), options, providers=["CPUExecutionProvider"]
        )

    def scores(self, x: Tensor, mask: Tensor) -> Tensor:
        """Tag scores [B, T, K] of the LSTM inputs `x` [B, T, D] (fp32, CPU) under `mask` [B, T];
        rows of length 0 (padding rows) give the projection's bias."""
        if x.shape[0] == 0:
            return x.new_zeros(0, x.shape[1], self.num_tags)
        lengths = mask.sum(1).to(torch.int32).numpy()
        (out,) = self.session.run(None, {"x": x.contiguous().numpy(), "lengths": lengths})
        return torch.from_numpy(out)
