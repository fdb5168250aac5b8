"""Running a TensorRT engine (TensorRT 10/11 named-tensor API): lifetime and inference only.

Per engine: page-locked host and device buffers for the profile's max batch, one CUDA stream,
optional CUDA graphs per batch size, and a lock that serialises `infer` across threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from huse.runtime.backends.base import BaseRunner
from huse.runtime.backends.trt.gpu import Cuda, gpu_status, import_tensorrt
from huse.runtime.backends.trt.loader import REBUILD_HINT, load_or_build, read_sidecar, token_range
from huse.runtime.files import sha256_file
from huse.runtime.errors import HuseError

__all__ = ["TrtRunner", "describe_io"]

log = logging.getLogger("huse.runtime")


@dataclass
class _IOTensor:
    name: str
    dtype: np.dtype
    is_input: bool
    min_shape: tuple[int, ...] = ()
    max_shape: tuple[int, ...] = ()
    dynamic: bool = False  # an input whose dim 0 is the batch (dynamic); a static one keeps its shape
    # Dims past the batch lie in min_shape..max_shape: equal, but for MiniLM's title length, set per call.
    host: np.ndarray = None  # page-locked, uint8, sized for max_shape
    device: int = 0


def _numpy_dtype(trt, name: str, trt_dtype, path) -> np.dtype:
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except TypeError:  # bf16, fp8, fp4, int4: numpy has no such type, so no host buffer can hold them
        raise HuseError(f"tensor '{name}' of TensorRT engine {path} is {trt_dtype}, which has no numpy type; huse "
                        "feeds and reads engines through numpy: export the graph with float32/float16/int32/int64 "
                        "inputs and outputs (cast to bf16/fp8 inside the graph)") from None


def describe_io(trt, engine, context, path) -> dict[str, _IOTensor]:
    """The engine's IO tensors with their dtypes and shapes at the profile's largest batch.

    Inputs whose dim 0 is dynamic take profile 0's max shape (set on `context`); outputs take
    the shape TensorRT infers from it.

    Args:
        trt: the tensorrt module; engine, context: the engine and an execution context of it.
        path: the engine file, for errors.
    Returns:
        name -> _IOTensor (no buffers yet), inputs and outputs in the engine's order.
    Raises:
        HuseError: an IO type numpy cannot hold (bf16, fp8), a refused shape, or a data-dependent
            output shape (-1 after the inputs are set: a NonZero-like graph).
    """
    io = {}
    for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
        t = _IOTensor(name, _numpy_dtype(trt, name, engine.get_tensor_dtype(name), path),
                      engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)
        io[name] = t
        if t.is_input:
            shape = tuple(engine.get_tensor_shape(name))
            t.dynamic = bool(shape) and shape[0] < 0
            if any(d < 0 for d in shape):  # dynamic: the build's profile 0 bounds it
                low, _, high = engine.get_tensor_profile_shape(name, 0)
                t.min_shape, t.max_shape = tuple(low), tuple(high)
            else:
                t.min_shape = t.max_shape = shape
            if not context.set_input_shape(name, t.max_shape):
                raise HuseError(f"TensorRT refused the profile's max shape {t.max_shape} for input '{name}' of "
                                f"{path}; {REBUILD_HINT}")
    for t in io.values():  # output sizes follow from the inputs at their max shapes
        if not t.is_input:
            t.max_shape = t.min_shape = tuple(context.get_tensor_shape(t.name))
            if any(d < 0 for d in t.max_shape):
                raise HuseError(f"output '{t.name}' of TensorRT engine {path} has a data-dependent shape "
                                f"{t.max_shape} (known only after running, as after NonZero); huse sizes output "
                                "buffers from the input shapes: export a graph whose output shapes follow from them")
    return io


class TrtRunner(BaseRunner):
    """Run a TensorRT engine file built by `huse.runtime.backends.trt.loader.build_engine`.

    Args:
        path: the serialised engine (`.engine`).
        manifest_entry: the engine's manifest entry (tensorrt_version, compute_capability, sha256);
            None reads the `<engine>.json` sidecar; without either only TensorRT's own check remains.
        cuda_graph_batches: batch sizes to capture as CUDA graphs (one execution context each).
        device: CUDA device ordinal.
    Raises:
        HuseError: tensorrt is not installed (naming the trt-cu12 / trt-cu13 extras).
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, *, manifest_entry: Mapping | None = None,
                 cuda_graph_batches: Iterable[int] = (), device: int = 0):
        super().__init__(path)
        self._trt = import_tensorrt()
        self.manifest_entry = dict(manifest_entry) if manifest_entry is not None else None
        self.cuda_graph_batches = tuple(sorted({int(b) for b in cuda_graph_batches}))
        self.device = device
        self._lock = threading.Lock()
        self._cuda = self._engine = self._context = self._stream = None
        self._io: dict[str, _IOTensor] = {}
        # batch -> (its own execution context, graph exec, output shapes): a graph replays fixed
        # kernels, so no later shape change on the shared context may touch what it captured.
        self._graphs: dict[int, tuple[object, object, dict]] = {}

    @classmethod
    def for_bundle(cls, bundle: str | Path, manifest: Mapping, graph: str, precision: str, *,
                   cache_dir: str | Path | None = None, device: int = 0, dla_core: int | None = None,
                   **kwargs) -> "TrtRunner":
        """The runner for one graph of a bundle on this machine.

        The bundle's engine for (graph, precision, DLA core) when built for this TensorRT and the
        GPU of `device`, else the engine cache (`loader.load_or_build`; `cache_dir` defaults to
        $HUSE_ENGINE_CACHE or ~/.cache/huse/engines), building from the bundle's ONNX as
        onnxruntime's TensorRT EP does.
        """
        bundle = Path(bundle)
        usable, reason, info = gpu_status(device)
        if not usable:
            raise HuseError(f"cannot run the {precision} {graph} graph of {bundle} with TensorRT: {reason}")
        here = (import_tensorrt().__version__, info.get("compute_capability"), dla_core)
        for entry in manifest.get("engines", []):
            if (entry.get("graph"), entry.get("precision")) == (graph, precision) \
                    and (entry.get("tensorrt_version"), entry.get("compute_capability"), entry.get("dla_core")) == here:
                return cls(bundle / entry["file"], manifest_entry=entry, device=device, **kwargs)
        onnx_name = manifest["models"][precision][graph]
        cache = Path(cache_dir or os.environ.get("HUSE_ENGINE_CACHE") or Path.home() / ".cache" / "huse" / "engines")
        path, entry = load_or_build(bundle / onnx_name, cache, precision=precision, timing_cache=cache / "timing.cache",
                                    onnx_sha256=manifest["files"].get(onnx_name), device=device, dla_core=dla_core,
                                    tokens=token_range(manifest))
        return cls(path, manifest_entry=entry, device=device, **kwargs)

    def activate_impl(self) -> None:
        """Check the engine fits this machine, deserialise it, allocate buffers, capture graphs."""
        if not self.path.is_file():
            raise HuseError(f"TensorRT engine {self.path} does not exist; {REBUILD_HINT}")
        usable, reason, info = gpu_status(self.device)
        if not usable:  # never construct trt.Runtime without a GPU: it can crash the process
            raise HuseError(f"cannot run TensorRT engine {self.path}: {reason}")
        entry = self.manifest_entry if self.manifest_entry is not None else read_sidecar(self.path)
        self._check_built_for(info, entry)
        trt, self._cuda = self._trt, Cuda(self.device)
        try:
            self._cuda.bind()
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            if entry and entry.get("dla_core") is not None:  # a DLA engine runs on the core it was built for
                runtime.DLA_core = int(entry["dla_core"])
            self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise HuseError(f"TensorRT {trt.__version__} could not deserialise {self.path} (see its log above): it was "
                                f"probably built with another TensorRT version or for another GPU; {REBUILD_HINT}")
            # Non-blocking: no implicit sync with the legacy default stream, and capturable.
            self._stream = self._cuda("cudaStreamCreateWithFlags", self._cuda.rt.cudaStreamNonBlocking)
            self._context = self._new_context()
            self._allocate(self._context)
            self._capture_graphs()
        except BaseException:
            with contextlib.suppress(Exception):
                self.deactivate_impl()
            raise

    def deactivate_impl(self) -> None:
        """Destroy graphs, contexts, engine, buffers and stream (in that order)."""
        with self._lock:
            cuda, stream = self._cuda, self._stream
            if stream is not None:
                cuda.bind()
                cuda("cudaStreamSynchronize", stream)
            for _, graph_exec, _ in self._graphs.values():
                cuda("cudaGraphExecDestroy", graph_exec)
            # TensorRT objects go before the memory their tensor addresses point at.
            self._graphs, self._context, self._engine = {}, None, None
            for t in self._io.values():
                if t.device:
                    cuda("cudaFree", t.device)
                if t.host is not None:
                    cuda("cudaFreeHost", t.host.ctypes.data)
            if stream is not None:
                cuda("cudaStreamDestroy", stream)
            self._cuda, self._stream, self._io = None, None, {}

    def _check_built_for(self, info: dict, entry: dict | None) -> None:
        if entry is None:
            return  # nothing to compare with: deserialize_cuda_engine still refuses foreign engines
        here_trt, here_cc = self._trt.__version__, info.get("compute_capability")
        found = []
        if entry.get("tensorrt_version") and entry["tensorrt_version"] != here_trt:
            found.append(f"TensorRT {entry['tensorrt_version']} (this machine has {here_trt})")
        if entry.get("compute_capability") and entry["compute_capability"] != here_cc:
            found.append(f"compute capability {entry['compute_capability']} ({entry.get('gpu_name', '?')}; "
                         f"this machine has {here_cc}, {info.get('name')})")
        if found:
            raise HuseError(f"TensorRT engine {self.path} was built with {' and '.join(found)}; an engine only runs on "
                            f"the TensorRT version and GPU architecture it was built for: {REBUILD_HINT}")
        if entry.get("sha256") and entry["sha256"] != sha256_file(self.path):
            raise HuseError(f"TensorRT engine {self.path} does not match the sha256 in its manifest entry; {REBUILD_HINT}")

    def _allocate(self, context) -> None:
        """Read the IO tensors, allocate host/device buffers for the profile's max batch, bind them to `context`."""
        self._io = describe_io(self._trt, self._engine, context, self.path)
        for t in self._io.values():
            nbytes = max(1, int(np.prod(t.max_shape)) * t.dtype.itemsize)
            t.host = self._cuda.host_alloc(nbytes)
            t.device = int(self._cuda("cudaMalloc", nbytes))
            context.set_tensor_address(t.name, t.device)

    def _new_context(self):
        context = self._engine.create_execution_context()
        if context is None:
            raise HuseError(f"TensorRT could not create an execution context for {self.path} (out of GPU memory?)")
        for t in self._io.values():  # every context points at the same buffers: the lock serialises calls
            context.set_tensor_address(t.name, t.device)
        return context

    def _set_shapes(self, context, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Set each dynamic input's shape for this call (IExecutionContext.set_input_shape); returns the
        output shapes TensorRT infers from them."""
        for t in self._io.values():
            if t.dynamic and not context.set_input_shape(t.name, shapes[t.name]):
                raise HuseError(f"TensorRT refused shape {shapes[t.name]} for input '{t.name}' of {self.path}")
        return {t.name: tuple(context.get_tensor_shape(t.name)) for t in self._io.values() if not t.is_input}

    def _batch_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Every input at `batch` rows and its largest other dims (what a CUDA graph is captured at)."""
        return {t.name: (batch, *t.max_shape[1:]) if t.dynamic else t.max_shape
                for t in self._io.values() if t.is_input}

    def _batch_range(self) -> tuple[int, int]:
        """The batch sizes the engine takes: profile 0 of the dynamic inputs (a static engine: its one batch)."""
        inputs = [t for t in self._io.values() if t.is_input]
        t = next((t for t in inputs if t.dynamic), inputs[0])
        return t.min_shape[0], t.max_shape[0]

    def _host_view(self, t: _IOTensor, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * t.dtype.itemsize
        return t.host[:nbytes].view(t.dtype).reshape(shape)

    def _enqueue(self, context, input_shapes: dict, output_shapes: dict, events=None) -> None:
        """Copy inputs in, execute, copy outputs out, on the stream; record `events[0..3]` between."""
        cuda, stream = self._cuda, self._stream

        def mark(i: int) -> None:
            if events:
                cuda("cudaEventRecord", events[i], stream)

        mark(0)
        for t in self._io.values():
            if t.is_input:
                view = self._host_view(t, input_shapes[t.name])
                cuda.copy(t.device, view.ctypes.data, view.nbytes, True, stream)
        mark(1)
        # The stream object itself, as TensorRT's samples pass it: cuda-bindings 13 deprecates int() on it.
        if not context.execute_async_v3(stream_handle=stream):
            raise HuseError(f"TensorRT execute_async_v3 failed for {self.path} at input shapes {input_shapes} "
                            "(see its log)")
        mark(2)
        for name, shape in output_shapes.items():
            view = self._host_view(self._io[name], shape)
            cuda.copy(view.ctypes.data, self._io[name].device, view.nbytes, False, stream)
        mark(3)

    def _capture_graphs(self) -> None:
        """Capture a CUDA graph per requested batch; a batch whose capture fails runs without one
        (as trtexec falls back), with a warning that says why."""
        low, high = self._batch_range()
        for batch in self.cuda_graph_batches:
            if not low <= batch <= high:
                raise HuseError(f"CUDA graph batch {batch} is outside the engine's profile {low}..{high}; "
                                "pick batch sizes inside it")
            try:
                self._graphs[batch] = self._capture(batch)
            except HuseError as e:
                with contextlib.suppress(Exception):  # a failed capture leaves a non-sticky error: clear it
                    self._cuda.rt.cudaGetLastError()
                log.warning("CUDA graph capture for batch %d of %s failed (%s); that batch runs without a CUDA graph",
                            batch, self.path, e)

    def _capture(self, batch: int) -> tuple[object, object, dict]:
        context = self._new_context()
        inputs = self._batch_shapes(batch)
        shapes = self._set_shapes(context, inputs)
        # TensorRT's CUDA-graph recipe: enqueue once after setting shapes so deferred,
        # shape-dependent setup runs outside the capture, then capture on a non-default stream.
        self._enqueue(context, inputs, shapes)
        self._cuda("cudaStreamSynchronize", self._stream)
        return context, self._cuda.capture(self._stream, lambda: self._enqueue(context, inputs, shapes)), shapes

    @property
    def input_names(self) -> list[str]:
        self._require_active()
        return [t.name for t in self._io.values() if t.is_input]

    @property
    def output_names(self) -> list[str]:
        self._require_active()
        return [t.name for t in self._io.values() if not t.is_input]

    def _validate(self, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        expected = self.input_names
        if sorted(feed) != sorted(expected):
            raise HuseError(f"TensorRT engine {self.path.name} takes inputs {expected}; got {sorted(feed)}")
        arrays = {}
        for name in expected:
            t, arr = self._io[name], np.asarray(feed[name])
            # float64 -> float32 and int64 -> int32 are fine; float -> int would hide a bug.
            if not np.can_cast(arr.dtype, t.dtype, casting="same_kind"):
                raise HuseError(f"input '{name}' is {arr.dtype}; the engine takes {t.dtype}")
            if not t.dynamic and arr.shape != t.max_shape:
                raise HuseError(f"input '{name}' has shape {arr.shape}; the engine takes exactly {t.max_shape}")
            if arr.ndim != len(t.max_shape) or not all(lo <= d <= hi for d, lo, hi in
                                                       zip(arr.shape[1:], t.min_shape[1:], t.max_shape[1:])):
                takes = ", ".join(str(hi) if lo == hi else f"{lo}..{hi}"
                                  for lo, hi in zip(t.min_shape[1:], t.max_shape[1:]))
                raise HuseError(f"input '{name}' has shape {arr.shape}; the engine takes (batch, {takes})")
            arrays[name] = np.ascontiguousarray(arr, dtype=t.dtype)
        batch = {len(arrays[t.name]) for t in self._io.values() if t.dynamic} or {len(arrays[expected[0]])}
        if len(batch) > 1:
            raise HuseError(f"inputs have different batch sizes {sorted(batch)}: {[a.shape for a in arrays.values()]}")
        (batch,), (low, high) = batch, self._batch_range()
        if not low <= batch <= high:
            raise HuseError(f"batch {batch} is outside the engine's profile {low}..{high}; "
                            "split the batch, or rebuild with a larger max batch")
        return arrays, batch

    def _run(self, feed: dict[str, np.ndarray], events=None) -> tuple[dict[str, np.ndarray], bool]:
        """One batch through the CUDA graph for its size, or the shared context (`events` as in
        `_enqueue`). Returns the outputs and whether a CUDA graph ran."""
        arrays, batch = self._validate(feed)
        cuda, stream = self._cuda, self._stream
        cuda.bind()
        for name, arr in arrays.items():
            np.copyto(self._host_view(self._io[name], arr.shape), arr)
        # A CUDA graph replays the shapes it was captured at: the batch's, every other dim at its largest.
        graphed = batch in self._graphs and all(arrays[n].shape == s for n, s in self._batch_shapes(batch).items())
        if graphed:
            _, graph_exec, shapes = self._graphs[batch]
            if events:
                cuda("cudaEventRecord", events[0], stream)
            cuda("cudaGraphLaunch", graph_exec, stream)
            if events:
                cuda("cudaEventRecord", events[1], stream)
        else:
            inputs = {name: arr.shape for name, arr in arrays.items()}
            shapes = self._set_shapes(self._context, inputs)
            self._enqueue(self._context, inputs, shapes, events)
        cuda("cudaStreamSynchronize", stream)
        return {name: self._host_view(self._io[name], shape).copy() for name, shape in shapes.items()}, graphed

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: input name -> array (batch first, every input) to output name -> a fresh array."""
        with self._lock:
            return self._run(feed)[0]

    def infer_phases(self, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """`infer`, timed on the GPU with CUDA events: host-to-device, compute, device-to-host (ms).

        With a captured CUDA graph for this batch size the three run as one launch, reported as
        "graph_ms". Host-side copies into the page-locked buffers are not included.
        """
        self._require_active()
        with self._lock:
            cuda = self._cuda
            cuda.bind()
            events = [cuda("cudaEventCreate") for _ in range(4)]
            try:
                outputs, graphed = self._run(feed, events)
                if graphed:
                    phases = {"graph_ms": cuda.elapsed_ms(events[0], events[1])}
                else:
                    phases = {f"{p}_ms": cuda.elapsed_ms(events[i], events[i + 1]) for i, p in enumerate(("h2d", "compute", "d2h"))}
            finally:
                for e in events:
                    cuda("cudaEventDestroy", e)
        return outputs, phases
