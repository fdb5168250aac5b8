"""TensorRT backend: run a serialised engine with the TensorRT 10/11 named-tensor API.

One code path for two CUDA bindings: cuda-python (default; `cuda.bindings.runtime`, or
`cuda.cudart` on 12.x as JetPack 6 ships) and pycuda (when that is what the device has). Each is
a small adapter with the same methods; the runner only talks to the adapter.

Per engine the runner keeps page-locked host buffers and device buffers sized for the profile's
max batch, one CUDA stream, and optionally one CUDA graph per fixed batch size. A lock makes
`infer` safe to call from several threads (calls are serialised: one stream, one set of buffers).

Nothing here imports tensorrt or a CUDA binding at module import; `TrtRunner(...)` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from huse.runtime._lazy import lazy_import
from huse.runtime.backends.base import BaseRunner
from huse.runtime.backends.trt.gpu import TRT_EXTRA_HINT, cuda_error_text, gpu_status, load_cudart
from huse.runtime.bundle import sha256_file
from huse.runtime.errors import HuseError

REBUILD_HINT = (
    "rebuild the engine from the bundle's ONNX on this machine "
    "(huse.runtime.backends.trt.builder.build_engine, or load_or_build with an engine cache directory)"
)


# -- small file helpers shared with huse.runtime.backends.trt.builder -------------------------------------------


def sidecar_path(engine_path: str | Path) -> Path:
    """Where an engine's JSON description lives: `<engine file>.json` next to it."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: str | Path) -> dict | None:
    """The manifest entry written next to an engine by `build_engine`, or None when there is none."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HuseError(f"engine description {path} is not valid JSON ({e}); delete it and {REBUILD_HINT}") from e


# -- CUDA binding adapters -------------------------------------------------------------------------


class _CudaPython:
    """cuda-python runtime API. Every call returns `(cudaError_t, *results)`."""

    name = "cuda-python"
    supports_graphs = True

    def __init__(self, cudart, device: int):
        self.rt = cudart
        self.device = device

    def _call(self, what: str, result):
        if int(result[0]) != 0:
            raise HuseError(f"CUDA call {what} failed on GPU {self.device}: {cuda_error_text(self.rt, result[0])}")
        rest = result[1:]
        if len(rest) > 1:  # e.g. cuda-python 11's three-value cudaGraphInstantiate: never hand back None
            raise HuseError(f"CUDA call {what} returned {len(rest)} values; huse needs cuda-python 12 or newer "
                            "(pip install 'huse-edge[trt]')")
        return rest[0] if rest else None

    @contextlib.contextmanager
    def bound(self):
        # The runtime API keeps the current device per thread: set it in whichever thread calls.
        self._call("cudaSetDevice", self.rt.cudaSetDevice(self.device))
        yield

    def host_alloc(self, nbytes: int) -> np.ndarray:
        ptr = self._call("cudaMallocHost", self.rt.cudaMallocHost(nbytes))
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(int(ptr)))

    def host_free(self, host: np.ndarray) -> None:
        self._call("cudaFreeHost", self.rt.cudaFreeHost(host.ctypes.data))

    def device_alloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", self.rt.cudaMalloc(nbytes)))

    def device_free(self, ptr: int) -> None:
        self._call("cudaFree", self.rt.cudaFree(ptr))

    def stream_create(self):
        # Non-blocking: no implicit sync with the legacy default stream, and capturable.
        return self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))

    def stream_handle(self, stream) -> int:
        return int(stream)

    def stream_destroy(self, stream) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def h2d(self, device_ptr: int, host: np.ndarray, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(device_ptr, host.ctypes.data, host.nbytes, kind, stream))

    def d2h(self, host: np.ndarray, device_ptr: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(host.ctypes.data, device_ptr, host.nbytes, kind, stream))

    def sync(self, stream) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def begin_capture(self, stream) -> None:
        # Thread-local mode: unrelated CUDA calls in other threads cannot invalidate the capture.
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("cudaStreamBeginCapture", self.rt.cudaStreamBeginCapture(stream, mode))

    def end_capture_instantiate(self, stream):
        graph = self._call("cudaStreamEndCapture", self.rt.cudaStreamEndCapture(stream))
        try:
            return self._call("cudaGraphInstantiate", self.rt.cudaGraphInstantiate(graph, 0))
        finally:  # the executable graph does not need the template graph
            self._call("cudaGraphDestroy", self.rt.cudaGraphDestroy(graph))

    def graph_launch(self, graph_exec, stream) -> None:
        self._call("cudaGraphLaunch", self.rt.cudaGraphLaunch(graph_exec, stream))

    def graph_destroy(self, graph_exec) -> None:
        self._call("cudaGraphExecDestroy", self.rt.cudaGraphExecDestroy(graph_exec))

    def event_create(self):
        return self._call("cudaEventCreate", self.rt.cudaEventCreate())

    def event_record(self, event, stream) -> None:
        self._call("cudaEventRecord", self.rt.cudaEventRecord(event, stream))

    def event_ms(self, start, end) -> float:
        """Milliseconds between two recorded events (waits for `end`)."""
        self._call("cudaEventSynchronize", self.rt.cudaEventSynchronize(end))
        return float(self._call("cudaEventElapsedTime", self.rt.cudaEventElapsedTime(start, end)))

    def event_destroy(self, event) -> None:
        self._call("cudaEventDestroy", self.rt.cudaEventDestroy(event))


class _PyCuda:
    """pycuda driver API, on the device's primary context (the one TensorRT's runtime API uses)."""

    name = "pycuda"
    # pycuda's stream-capture API is not part of what huse relies on: CUDA graphs need cuda-python.
    supports_graphs = False

    def __init__(self, drv, device: int):
        drv.init()
        self.drv = drv
        self.device = device
        self.ctx = drv.Device(device).retain_primary_context()
        self._device_allocs: dict[int, object] = {}

    @contextlib.contextmanager
    def bound(self):
        # Driver-API contexts are per thread: push for the duration of the call, pop after.
        self.ctx.push()
        try:
            yield
        finally:
            self.drv.Context.pop()

    def host_alloc(self, nbytes: int) -> np.ndarray:
        return self.drv.pagelocked_empty(nbytes, np.uint8)

    def host_free(self, host: np.ndarray) -> None:
        pass  # pycuda frees page-locked memory when the array is garbage collected

    def device_alloc(self, nbytes: int) -> int:
        alloc = self.drv.mem_alloc(nbytes)
        self._device_allocs[int(alloc)] = alloc
        return int(alloc)

    def device_free(self, ptr: int) -> None:
        self._device_allocs.pop(ptr).free()

    def stream_create(self):
        return self.drv.Stream()

    def stream_handle(self, stream) -> int:
        return int(stream.handle)

    def stream_destroy(self, stream) -> None:
        pass  # destroyed with the Python object

    def h2d(self, device_ptr: int, host: np.ndarray, stream) -> None:
        self.drv.memcpy_htod_async(device_ptr, host, stream)

    def d2h(self, host: np.ndarray, device_ptr: int, stream) -> None:
        self.drv.memcpy_dtoh_async(host, device_ptr, stream)

    def sync(self, stream) -> None:
        stream.synchronize()

    def event_create(self):
        return self.drv.Event()

    def event_record(self, event, stream) -> None:
        event.record(stream)

    def event_ms(self, start, end) -> float:
        end.synchronize()
        return float(start.time_till(end))

    def event_destroy(self, event) -> None:
        pass  # destroyed with the Python object


def make_cuda_binding(kind: str = "auto", device: int = 0):
    """The CUDA binding adapter the runner uses.

    Args:
        kind: "auto" (cuda-python, else pycuda), "cuda-python" or "pycuda".
        device: CUDA device ordinal.
    Returns:
        An adapter object with the `_CudaPython` methods.
    """
    known = ("auto", "cuda-python", "pycuda")
    if kind not in known:
        raise HuseError(f"CUDA binding {kind!r} was asked for; known bindings are {list(known)}")
    if kind in ("auto", "cuda-python"):
        cudart = load_cudart()
        if cudart is not None:
            return _CudaPython(cudart, device)
        if kind == "cuda-python":
            raise HuseError(f"the cuda-python binding was asked for but is not installed; {TRT_EXTRA_HINT}")
    try:
        drv = importlib.import_module("pycuda.driver")
    except Exception as e:
        raise HuseError(
            f"no CUDA binding found: cuda-python is not installed and pycuda could not be imported "
            f"({type(e).__name__}: {e}); {TRT_EXTRA_HINT}"
        ) from e
    return _PyCuda(drv, device)


# -- the runner --------------------------------------------------------------------------------------


@dataclass
class _IOTensor:
    name: str
    dtype: np.dtype
    is_input: bool
    min_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    host: np.ndarray = None  # page-locked, uint8, sized for max_shape
    device: int = 0


@dataclass
class _CudaGraph:
    # A graph replays fixed kernels for one batch size; it gets its own execution context so no
    # later shape change on the shared context can touch the state it was captured with.
    context: object
    graph_exec: object
    output_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class TrtRunner(BaseRunner):
    """Run a TensorRT engine file built by `huse.runtime.backends.trt.builder.build_engine`.

    Args:
        path: the serialised engine (`.engine`).
        manifest_entry: the bundle manifest's entry for this engine (tensorrt_version,
            compute_capability, sha256, ...). When None, the `<engine>.json` sidecar is used;
            when neither exists, only TensorRT's own deserialisation check remains.
        cuda_graph_batches: batch sizes to capture as CUDA graphs at activation (each costs one
            extra execution context of device memory); other batch sizes run normally.
        binding: "auto", "cuda-python" or "pycuda".
        device: CUDA device ordinal.
    Raises:
        HuseError: tensorrt is not installed (naming the `trt` extra).
    """

    name = "tensorrt"

    def __init__(
        self,
        path: str | Path,
        *,
        manifest_entry: Mapping | None = None,
        cuda_graph_batches: Iterable[int] = (),
        binding: str = "auto",
        device: int = 0,
    ):
        super().__init__(path)
        self._trt = lazy_import("tensorrt", "trt")
        self.manifest_entry = dict(manifest_entry) if manifest_entry is not None else None
        self.cuda_graph_batches = tuple(sorted({int(b) for b in cuda_graph_batches}))
        self.binding = binding
        self.device = device
        self._lock = threading.Lock()
        self._clear()

    @classmethod
    def for_bundle(cls, bundle: str | Path, manifest: Mapping, graph: str, precision: str, *,
                   cache_dir: str | Path | None = None, **kwargs) -> "TrtRunner":
        """The runner for one graph of a bundle on this machine.

        Uses the bundle's engine for (graph, precision) when it was built for this TensorRT
        version and GPU; otherwise the engine cache (keyed by TensorRT version, GPU, precision,
        profile and ONNX hash), building into it from the bundle's ONNX when a TensorRT builder
        is installed, as onnxruntime's TensorRT provider and jetson-inference do.

        Args:
            bundle: the bundle directory.
            manifest: its verified manifest.
            graph: "image", "text" or "fused".
            precision: "fp32", "fp16" or "int8".
            cache_dir: engine cache (default: $HUSE_ENGINE_CACHE or ~/.cache/huse/engines).
        """
        from huse.runtime.backends.trt.builder import build_engine, engine_support

        bundle = Path(bundle)
        trt_version = lazy_import("tensorrt", "trt").__version__
        _, _, info = gpu_status()
        for entry in manifest.get("engines", []):
            if (entry.get("graph"), entry.get("precision"), entry.get("tensorrt_version"), entry.get("compute_capability")) \
                    == (graph, precision, trt_version, info.get("compute_capability")):
                return cls(bundle / entry["file"], manifest_entry=entry, **kwargs)
        onnx_name = manifest["models"][precision][graph]
        cache = Path(cache_dir or os.environ.get("HUSE_ENGINE_CACHE") or Path.home() / ".cache" / "huse" / "engines")
        can_build, _ = engine_support()
        build = (lambda o, e, **kw: build_engine(o, e, precision=precision, **kw)) if can_build else None
        path, entry = load_or_build(bundle / onnx_name, cache, precision=precision, build=build,
                                    onnx_sha256=manifest["files"].get(onnx_name), timing_cache=cache / "timing.cache")
        return cls(path, manifest_entry=entry, **kwargs)

    def _clear(self) -> None:
        self._cuda = None
        self._runtime = self._engine = self._context = self._stream = None
        self._io: dict[str, _IOTensor] = {}
        self._graphs: dict[int, _CudaGraph] = {}

    # -- lifetime ------------------------------------------------------------------------------

    def activate(self) -> None:
        """Check the engine fits this machine, deserialise it, allocate buffers, capture graphs."""
        if not self.path.is_file():
            raise HuseError(f"TensorRT engine {self.path} does not exist; {REBUILD_HINT}")
        usable, reason, info = gpu_status(self.device)
        if not usable:  # never construct trt.Runtime without a GPU: it can crash the process
            raise HuseError(f"cannot run TensorRT engine {self.path}: {reason}")
        entry = self.manifest_entry if self.manifest_entry is not None else read_sidecar(self.path)
        self._check_built_for(info, entry)
        self._cuda = make_cuda_binding(self.binding, self.device)
        if self.cuda_graph_batches and not self._cuda.supports_graphs:
            raise HuseError(
                f"CUDA graphs were asked for (batches {list(self.cuda_graph_batches)}) but the {self._cuda.name} "
                "binding does not capture them here; install cuda-python or pass cuda_graph_batches=()"
            )
        trt = self._trt
        try:
            with self._cuda.bound():
                self._logger = trt.Logger(trt.Logger.WARNING)
                self._runtime = trt.Runtime(self._logger)
                if entry and entry.get("dla_core") is not None:  # a DLA engine runs on the core it was built for
                    self._runtime.DLA_core = int(entry["dla_core"])
                self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
                if self._engine is None:
                    raise HuseError(
                        f"TensorRT {trt.__version__} could not deserialise {self.path} (see its log above): "
                        f"it was probably built with another TensorRT version or for another GPU; {REBUILD_HINT}"
                    )
                self._stream = self._cuda.stream_create()
                self._context = self._new_context()
                self._allocate(self._context)
                self._bind(self._context)
                for batch in self.cuda_graph_batches:
                    self._graphs[batch] = self._capture(batch)
        except BaseException:
            with contextlib.suppress(Exception):
                self._release()
            raise
        self.is_active = True

    def deactivate(self) -> None:
        """Destroy graphs, contexts, engine, buffers and stream (in that order)."""
        with self._lock:
            self._release()
        self.is_active = False

    def _release(self) -> None:
        cuda = self._cuda
        if cuda is None:
            self._clear()
            return
        with cuda.bound():
            if self._stream is not None:
                cuda.sync(self._stream)
            for graph in self._graphs.values():
                cuda.graph_destroy(graph.graph_exec)
            # TensorRT objects go before the memory their tensor addresses point at.
            self._graphs.clear()
            self._context = self._engine = self._runtime = None
            for t in self._io.values():
                if t.device:
                    cuda.device_free(t.device)
                if t.host is not None:
                    cuda.host_free(t.host)
            if self._stream is not None:
                cuda.stream_destroy(self._stream)
        self._clear()

    def _check_built_for(self, info: dict, entry: dict | None) -> None:
        if entry is None:
            return  # nothing to compare with: deserialize_cuda_engine still refuses foreign engines
        here_trt, here_cc = self._trt.__version__, info.get("compute_capability")
        found = []
        if entry.get("tensorrt_version") and entry["tensorrt_version"] != here_trt:
            found.append(f"TensorRT {entry['tensorrt_version']} (this machine has {here_trt})")
        if entry.get("compute_capability") and entry["compute_capability"] != here_cc:
            found.append(
                f"compute capability {entry['compute_capability']} ({entry.get('gpu_name', '?')}; "
                f"this machine has {here_cc}, {info.get('name')})"
            )
        if found:
            raise HuseError(
                f"TensorRT engine {self.path} was built with {' and '.join(found)}; an engine only runs on the "
                f"TensorRT version and GPU architecture it was built for: {REBUILD_HINT}"
            )
        if entry.get("sha256") and entry["sha256"] != sha256_file(self.path):
            raise HuseError(f"TensorRT engine {self.path} does not match the sha256 in its manifest entry; {REBUILD_HINT}")

    # -- buffers, contexts, graphs -----------------------------------------------------------------

    def _allocate(self, context) -> None:
        """Read the IO tensors and allocate host/device buffers for the profile's max batch."""
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            self._io[name] = _IOTensor(name, dtype, is_input, (), ())
            if is_input:
                shape = tuple(engine.get_tensor_shape(name))
                if any(d < 0 for d in shape):  # dynamic: the build's profile 0 bounds it
                    low, _, high = engine.get_tensor_profile_shape(name, 0)
                    shape_min, shape_max = tuple(low), tuple(high)
                else:
                    shape_min = shape_max = shape
                self._io[name].min_shape, self._io[name].max_shape = shape_min, shape_max
                if not context.set_input_shape(name, shape_max):
                    raise HuseError(f"TensorRT refused the profile's max shape {shape_max} for input '{name}' of "
                                    f"{self.path}; {REBUILD_HINT}")
        for t in self._io.values():  # output sizes follow from the inputs at their max shapes
            if not t.is_input:
                t.max_shape = t.min_shape = tuple(context.get_tensor_shape(t.name))
        for t in self._io.values():
            nbytes = max(1, int(np.prod(t.max_shape)) * t.dtype.itemsize)
            t.host = self._cuda.host_alloc(nbytes)
            t.device = self._cuda.device_alloc(nbytes)

    def _new_context(self):
        context = self._engine.create_execution_context()
        if context is None:
            raise HuseError(f"TensorRT could not create an execution context for {self.path} (out of GPU memory?)")
        return context

    def _bind(self, context) -> None:
        # Every context points at the same buffers: calls are serialised by the lock.
        for t in self._io.values():
            context.set_tensor_address(t.name, t.device)

    def _set_batch(self, context, batch: int) -> dict[str, tuple[int, ...]]:
        for t in self._io.values():
            if t.is_input and not context.set_input_shape(t.name, (batch, *t.max_shape[1:])):
                raise HuseError(f"TensorRT refused batch {batch} for input '{t.name}' of {self.path}")
        return {t.name: tuple(context.get_tensor_shape(t.name)) for t in self._io.values() if not t.is_input}

    def _host_view(self, t: _IOTensor, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * t.dtype.itemsize
        return t.host[:nbytes].view(t.dtype).reshape(shape)

    def _enqueue(self, context, batch: int, output_shapes: dict) -> None:
        cuda, stream = self._cuda, self._stream
        for t in self._io.values():
            if t.is_input:
                cuda.h2d(t.device, self._host_view(t, (batch, *t.max_shape[1:])), stream)
        if not context.execute_async_v3(cuda.stream_handle(stream)):
            raise HuseError(f"TensorRT execute_async_v3 failed for {self.path} at batch {batch} (see its log)")
        for name, shape in output_shapes.items():
            t = self._io[name]
            cuda.d2h(self._host_view(t, shape), t.device, stream)

    def _capture(self, batch: int) -> _CudaGraph:
        first = next(t for t in self._io.values() if t.is_input)
        if not first.min_shape[0] <= batch <= first.max_shape[0]:
            raise HuseError(
                f"CUDA graph batch {batch} is outside the engine's profile "
                f"{first.min_shape[0]}..{first.max_shape[0]}; pick batch sizes inside it"
            )
        cuda, stream = self._cuda, self._stream
        context = self._new_context()
        self._bind(context)
        shapes = self._set_batch(context, batch)
        # TensorRT's CUDA-graph recipe: enqueue once after setting shapes so deferred,
        # shape-dependent setup runs outside the capture, then capture on a non-default stream.
        self._enqueue(context, batch, shapes)
        cuda.sync(stream)
        cuda.begin_capture(stream)
        try:
            self._enqueue(context, batch, shapes)
        except BaseException:
            with contextlib.suppress(Exception):  # leave capture mode, keep the original error
                cuda.end_capture_instantiate(stream)
            raise
        return _CudaGraph(context, cuda.end_capture_instantiate(stream), shapes)

    # -- inference -----------------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        self._require_active()
        return [t.name for t in self._io.values() if t.is_input]

    @property
    def output_names(self) -> list[str]:
        self._require_active()
        return [t.name for t in self._io.values() if not t.is_input]

    def _require_active(self) -> None:
        if not self.is_active:
            raise HuseError(f"TrtRunner for {self.path} is not active; use it as `with TrtRunner(path) as runner:`")

    def _validate(self, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        expected = self.input_names
        if sorted(feed) != sorted(expected):
            raise HuseError(f"TensorRT engine {self.path.name} takes inputs {expected}; got {sorted(feed)}")
        arrays, batch = {}, None
        for name in expected:
            t, arr = self._io[name], np.asarray(feed[name])
            if arr.dtype != t.dtype:
                # float64 -> float32 and int64 -> int32 are fine; float -> int would hide a bug.
                if not np.can_cast(arr.dtype, t.dtype, casting="same_kind"):
                    raise HuseError(f"input '{name}' is {arr.dtype}; the engine takes {t.dtype}")
                arr = arr.astype(t.dtype)
            if arr.ndim != len(t.max_shape) or arr.shape[1:] != t.max_shape[1:]:
                raise HuseError(
                    f"input '{name}' has shape {arr.shape}; the engine takes (batch, {', '.join(map(str, t.max_shape[1:]))})"
                )
            if batch is not None and arr.shape[0] != batch:
                raise HuseError(f"inputs have different batch sizes ({batch} and {arr.shape[0]} for '{name}')")
            batch = arr.shape[0]
            if not t.min_shape[0] <= batch <= t.max_shape[0]:
                raise HuseError(
                    f"batch {batch} is outside the engine's profile {t.min_shape[0]}..{t.max_shape[0]}; "
                    "split the batch, or rebuild with a larger max batch"
                )
            arrays[name] = np.ascontiguousarray(arr)
        return arrays, batch

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            feed: input name -> array (batch first); every engine input, same batch size.
        Returns:
            Output name -> a fresh array (the runner's buffers are reused by the next call).
        """
        self._require_active()
        arrays, batch = self._validate(feed)
        with self._lock, self._cuda.bound():
            for name, arr in arrays.items():
                np.copyto(self._host_view(self._io[name], arr.shape), arr)
            graph = self._graphs.get(batch)
            if graph is not None:
                self._cuda.graph_launch(graph.graph_exec, self._stream)
                shapes = graph.output_shapes
            else:
                shapes = self._set_batch(self._context, batch)
                self._enqueue(self._context, batch, shapes)
            self._cuda.sync(self._stream)
            return {name: self._host_view(self._io[name], shape).copy() for name, shape in shapes.items()}


    def infer_phases(self, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """`infer`, timed on the GPU with CUDA events: host-to-device, compute, device-to-host (ms).

        With a captured CUDA graph for this batch size the three run as one launch, reported as
        "graph_ms". Host-side copies into the page-locked buffers are not included.
        """
        self._require_active()
        arrays, batch = self._validate(feed)
        cuda, stream = self._cuda, self._stream
        with self._lock, cuda.bound():
            for name, arr in arrays.items():
                np.copyto(self._host_view(self._io[name], arr.shape), arr)
            events = [cuda.event_create() for _ in range(4)]
            try:
                graph = self._graphs.get(batch)
                if graph is not None:
                    cuda.event_record(events[0], stream)
                    cuda.graph_launch(graph.graph_exec, stream)
                    cuda.event_record(events[1], stream)
                    shapes, phases = graph.output_shapes, {"graph_ms": cuda.event_ms(events[0], events[1])}
                else:
                    shapes = self._set_batch(self._context, batch)
                    cuda.event_record(events[0], stream)
                    for t in self._io.values():
                        if t.is_input:
                            cuda.h2d(t.device, self._host_view(t, (batch, *t.max_shape[1:])), stream)
                    cuda.event_record(events[1], stream)
                    if not self._context.execute_async_v3(cuda.stream_handle(stream)):
                        raise HuseError(f"TensorRT execute_async_v3 failed for {self.path} at batch {batch} (see its log)")
                    cuda.event_record(events[2], stream)
                    for name, shape in shapes.items():
                        cuda.d2h(self._host_view(self._io[name], shape), self._io[name].device, stream)
                    cuda.event_record(events[3], stream)
                    phases = {"h2d_ms": cuda.event_ms(events[0], events[1]),
                              "compute_ms": cuda.event_ms(events[1], events[2]),
                              "d2h_ms": cuda.event_ms(events[2], events[3])}
                cuda.sync(stream)
            finally:
                for e in events:
                    cuda.event_destroy(e)
            return {name: self._host_view(self._io[name], shape).copy() for name, shape in shapes.items()}, phases


# -- engine cache ------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")[:40] or "x"


def engine_cache_path(
    cache_dir: str | Path,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    precision: str,
    profile: Mapping | tuple | list,
    *,
    onnx_sha256: str | None = None,
) -> Path:
    """Where the engine for one (model, TensorRT, GPU, precision, profile) combination is cached.

    An engine is only valid for the TensorRT version and GPU it was built on, so each of these
    is part of the key (as in onnxruntime's TensorRT EP engine cache and jetson-inference).

    Args:
        cache_dir: the cache directory.
        trt_version: e.g. "10.3.0".
        gpu_name: e.g. "Orin" or "NVIDIA H100 80GB HBM3".
        compute_capability: e.g. "8.7".
        precision: "fp32", "fp16" or "int8".
        profile: the batch profile `(min, opt, max)` or the `{input: {min, opt, max}}` mapping.
        onnx_sha256: the source ONNX file's sha256, so a changed model never reuses an engine.
    Returns:
        `cache_dir/<precision>_trt<version>_sm<cc>_<gpu>_<hash>.engine`: readable parts for
        people, a hash over every part (profile and model included) for uniqueness.
    """
    key = json.dumps(
        {
            "trt": str(trt_version),
            "gpu": str(gpu_name),
            "cc": str(compute_capability),
            "precision": str(precision),
            "profile": profile,
            "onnx": onnx_sha256,
        },
        sort_keys=True,
        default=list,  # tuples and other sequences hash like lists
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cc = str(compute_capability).replace(".", "")
    name = f"{_slug(precision)}_trt{_slug(trt_version)}_sm{_slug(cc)}_{_slug(gpu_name)}_{digest}.engine"
    return Path(cache_dir) / name


def load_or_build(
    onnx_path: str | Path,
    cache_dir: str | Path,
    *,
    precision: str,
    batch: tuple[int, int, int] = (1, 8, 64),
    build: Callable[..., dict] | None = None,
    onnx_sha256: str | None = None,
    device: int = 0,
    **build_kwargs,
) -> tuple[Path, dict]:
    """Return the cached engine for this machine, building it from the bundle's ONNX if needed.

    The runtime must not import the export package, so the builder is passed in: give
    `build=huse.runtime.backends.trt.builder.build_engine` where a TensorRT builder is installed (a Jetson with
    JetPack, a GPU server). Without one, a missing engine is an error that says so.

    Args:
        onnx_path: the bundle's ONNX file for this precision.
        cache_dir: engine cache directory (created when building).
        precision: "fp32", "fp16" or "int8" (the bundle variant; part of the cache key).
        batch: (min, opt, max) batch of the optimization profile.
        build: `build_engine(onnx_path, engine_path, batch=..., **build_kwargs) -> dict`, or None.
        onnx_sha256: the ONNX file's sha256 when the manifest already has it (else computed).
        device: CUDA device ordinal.
        **build_kwargs: passed to `build` (workspace_mib, timing_cache, dla_core, ...).
    Returns:
        (engine_path, manifest_entry) for `TrtRunner(engine_path, manifest_entry=entry)`.
    """
    trt = lazy_import("tensorrt", "trt")
    usable, reason, info = gpu_status(device)
    if not usable:
        raise HuseError(f"cannot load or build a TensorRT engine for {onnx_path}: {reason}")
    onnx_sha256 = onnx_sha256 or sha256_file(onnx_path)
    engine_path = engine_cache_path(
        cache_dir, trt.__version__, info["name"], info["compute_capability"], precision, tuple(batch), onnx_sha256=onnx_sha256
    )
    entry = read_sidecar(engine_path)
    # A hit needs the engine and its description, and they must agree (no half-written files).
    if engine_path.is_file() and entry and entry.get("sha256") == sha256_file(engine_path):
        return engine_path, entry
    if build is None:
        raise HuseError(
            f"no TensorRT engine for {onnx_path} in {cache_dir} for TensorRT {trt.__version__} on {info['name']}, "
            "and no builder was given; pass build=huse.runtime.backends.trt.builder.build_engine "
            "(needs the full TensorRT with its ONNX parser: pip install 'huse-edge[export,trt]')"
        )
    os.makedirs(cache_dir, exist_ok=True)
    entry = build(onnx_path, engine_path, batch=tuple(batch), **build_kwargs)
    return engine_path, entry
