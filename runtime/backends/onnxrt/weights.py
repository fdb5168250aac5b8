"""The float16 weights of an ONNX graph, read without the `onnx` package (the lean runtime has none).

An FP16 bundle's graphs hold float16 initializers. On a CPU the runtime runs the bundle's float32 graph
with these weights in float32 (`OnnxrtRunner(weights=...)`, `float32_model_with_float16_weights`): what
onnxruntime did on x86 all along (it has no float16 kernels there and runs float32 kernels behind Casts),
made explicit, so that an Arm CPU, whose onnxruntime runs the float16 graph in float16 arithmetic, gives
the x86 answers (README, "Arm64").

Only what that needs is read (and, in the float32 graph's bytes, overwritten in place): ModelProto.graph
(field 7) -> GraphProto.initializer (field 5) -> TensorProto name (8), data_type (2), dims (1), raw_data
(9), off protobuf's wire format with the reader `huse.runtime.bundle` uses for the graphs' metadata (field
numbers from onnx/onnx.proto).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from huse.runtime.bundle import proto_fields, proto_varint
from huse.runtime.errors import HuseError

__all__ = ["float16_initializers", "float32_model_with_float16_weights"]

FLOAT, FLOAT16 = 1, 10  # TensorProto.DataType


def _initializers(buf) -> Iterator[tuple[str, int, list[int], tuple[int, int] | None]]:
    """(name, data_type, dims, raw_data span or None) of each initializer of a serialized ModelProto."""
    for number, wire, graph in proto_fields(buf):
        if number != 7 or wire != 2:
            continue
        for g_number, g_wire, tensor in proto_fields(buf, *graph):
            if g_number != 5 or g_wire != 2:
                continue
            name, dtype, dims, raw = "", 0, [], None
            for t_number, t_wire, value in proto_fields(buf, *tensor):
                if t_number == 8 and t_wire == 2:
                    name = bytes(buf[value[0]:value[1]]).decode("utf-8")
                elif t_number == 2 and t_wire == 0:
                    dtype = value
                elif t_number == 1 and t_wire == 0:
                    dims.append(value)
                elif t_number == 1 and t_wire == 2:  # packed dims
                    pos = value[0]
                    while pos < value[1]:
                        d, pos = proto_varint(buf, pos)
                        dims.append(d)
                elif t_number == 9 and t_wire == 2:
                    raw = value
            yield name, dtype, dims, raw


def float16_initializers(path: str | Path) -> dict[str, np.ndarray]:
    """The float16 initializers of an ONNX file, by name.

    Args:
        path: an .onnx file without external data.
    Returns:
        name -> float16 array of the initializer's shape.
    Raises:
        HuseError: the file is not a readable ONNX model, or a float16 initializer keeps its values
            outside raw_data (export writes raw_data).
    """
    import mmap

    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for name, dtype, dims, raw in _initializers(buf):
                if dtype != FLOAT16:
                    continue
                if raw is None:
                    raise HuseError(f"{path}: float16 initializer {name!r} keeps its values outside raw_data; "
                                    "re-export the bundle")
                out[name] = np.frombuffer(buf[raw[0]:raw[1]], dtype="<f2").reshape(dims).astype(np.float16)
    except (OSError, ValueError) as e:
        raise HuseError(f"cannot read the float16 weights of {path} ({e}); re-export the bundle") from None
    return out


def float32_model_with_float16_weights(path: str | Path, weights: str | Path) -> bytes:
    """The float32 graph `path`, serialized, with each initializer that `weights` (its FP16 copy) holds in
    float16 replaced by those values in float32: the model an FP16 bundle runs as on a CPU.

    The replacement is made in the serialized bytes (a float32 value takes the same 4 bytes whatever it
    rounds to), so onnxruntime loads the rounded weights as the model's own: every graph transformer sees
    them, the x86 NCHWc layout included, which builds its blocked convolution weights from the model's
    initializers (given through `SessionOptions.add_initializer` instead, some convolutions kept their
    float32 weights there, and without the transformer an fp16 bundle ran 2-5x slower than fp32).

    Args:
        path: the float32 .onnx file.
        weights: the FP16 .onnx file of the same graph (same initializer names and shapes).
    Returns:
        The model's bytes, for `onnxruntime.InferenceSession`.
    Raises:
        HuseError: a file is unreadable, or an initializer differs between the two (name, type or shape).
    """
    rounded = float16_initializers(weights)
    try:
        buf = bytearray(Path(path).read_bytes())
        done = set()
        for name, dtype, dims, raw in _initializers(buf):
            w = rounded.get(name)
            if w is None:
                continue
            if dtype != FLOAT or raw is None or list(w.shape) != dims or raw[1] - raw[0] != 4 * w.size:
                raise HuseError(f"{path}: initializer {name!r} is not the float32 counterpart of the one in "
                                f"{weights}; re-export the bundle")
            buf[raw[0]:raw[1]] = np.ascontiguousarray(w, dtype="<f4").tobytes()
            done.add(name)
    except (OSError, ValueError) as e:
        raise HuseError(f"cannot read {path} ({e}); re-export the bundle") from None
    if missing := sorted(set(rounded) - done):
        raise HuseError(f"{path} has no float32 initializer {missing[0]!r} that {weights} holds in float16; "
                        "re-export the bundle")
    return bytes(buf)
