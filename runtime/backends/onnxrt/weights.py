"""The float16 weights of an ONNX graph, read without the `onnx` package (the lean runtime has none).

An FP16 bundle's graphs hold float16 initializers. On a CPU the runtime runs the bundle's float32
graph with these weights in float32 (`OnnxrtRunner(weights=...)`): what onnxruntime did on x86 all
along (it has no float16 kernels there and runs float32 kernels behind Casts), made explicit, so
that an Arm CPU, whose onnxruntime runs the float16 graph in float16 arithmetic, gives the x86
answers (README, "Arm64").

Only what that needs is read: ModelProto.graph (field 7) -> GraphProto.initializer (field 5) ->
TensorProto name (8), data_type (2), dims (1), raw_data (9), off protobuf's wire format with the
reader `huse.runtime.bundle` uses for the graphs' metadata (field numbers from onnx/onnx.proto).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from huse.runtime.bundle import proto_fields, proto_varint
from huse.runtime.errors import HuseError

__all__ = ["KEEPS_FILE_WEIGHTS", "add_float16_weights", "float16_initializers"]

FLOAT16 = 10  # TensorProto.DataType.FLOAT16
# onnxruntime's graph transformers that build their own weights from the model file's initializers rather
# than from `SessionOptions.add_initializer`'s: a session given other weights runs without them. The NCHWc
# layout transformer (x86 only) did: with it some convolutions kept their float32 weights (the demo image
# graph's logits 0.020 from the float32 graph with its weights rounded to float16; without it 5e-6).
KEEPS_FILE_WEIGHTS = ("NchwcTransformer",)


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
                    if dtype != FLOAT16:
                        continue
                    if raw is None:
                        raise HuseError(f"{path}: float16 initializer {name!r} keeps its values outside raw_data; "
                                        "re-export the bundle")
                    out[name] = np.frombuffer(buf[raw[0]:raw[1]], dtype="<f2").reshape(dims).astype(np.float16)
    except (OSError, ValueError) as e:
        raise HuseError(f"cannot read the float16 weights of {path} ({e}); re-export the bundle") from None
    return out


def add_float16_weights(opts, path: str | Path) -> list:
    """Give onnxruntime session options the float16 weights of `path`, in float32, in place of the graph's
    initializers of the same names (`SessionOptions.add_initializer`).

    Args:
        opts: an onnxruntime.SessionOptions.
        path: the FP16 graph whose weights to use.
    Returns:
        The OrtValues handed over: keep them until the session is gone (onnxruntime does not own them).
    """
    from huse.runtime._lazy import lazy_import

    ort = lazy_import("onnxruntime", "ort")
    values = []
    for name, w in float16_initializers(path).items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        opts.add_initializer(name, value)
        values.append(value)
    return values
