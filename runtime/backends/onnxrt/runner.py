"""onnxruntime backend: CPU by default, CUDA when asked for and available."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from huse.runtime._lazy import lazy_import
from huse.runtime.backends.base import BaseRunner
from huse.runtime.errors import HuseError

__all__ = ["OnnxrtRunner", "cuda_provider_status", "graph_row_parts", "graph_threads", "onnx_files", "share_threads"]

# The size of the one intra-op thread pool all of this process's sessions share (`share_threads`), or None:
# each session has its own. Whether this process has made a session yet (the pool must come first).
_shared_threads: int | None = None
_made_a_session = False


def _new_session(ort, model, opts, providers: list[str]):
    """Every onnxruntime session of the runtime starts here: on the process's shared pool if there is one."""
    global _made_a_session
    _made_a_session = True
    if _shared_threads is not None:  # onnxruntime refuses a session with a pool of its own then
        opts.use_per_session_threads = False
    return ort.InferenceSession(model, opts, providers=providers)

# Fewest rows a part of a split batch gets: below it the hand-off to another thread costs more than
# the rows (the word-CNN text graph: about 9 us a row on one core, a hand-off tens of us).
MIN_ROWS_PER_PART = 16


# A one-node ONNX model (Identity on a float[1], opset 13, IR 7): enough to ask onnxruntime
# whether its CUDA provider really starts, without shipping the `onnx` package in the runtime.
# tests/runtime/test_onnxrt_cuda.py rebuilds it with onnx and checks these bytes.
PROBE_MODEL = (b'\x08\x07\x12\x00:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08'
               b'\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r')

CUDA_HINT = ("onnxruntime-gpu needs a GPU, its driver and the CUDA/cuDNN libraries it was built for "
             "(https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements); "
             "or use device='cpu'")


def _cuda_active(session) -> bool:
    return "CUDAExecutionProvider" in session.get_providers()


@functools.cache
def cuda_provider_status() -> tuple[bool, str]:
    """Whether onnxruntime's CUDA provider actually runs here.

    Being listed by `get_available_providers()` is not enough: onnxruntime-gpu lists CUDA on
    any machine, and when the GPU, driver or CUDA libraries are missing a session silently
    falls back to the CPU. So this opens a one-node session on CUDA and checks which
    providers it kept. Cached: the answer does not change within a process.

    Returns:
        (usable, reason).
    """
    try:
        import onnxruntime as ort
    except Exception as e:
        return False, f"onnxruntime is not importable ({e})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "onnxruntime has no CUDAExecutionProvider (CPU-only onnxruntime installed)"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = _new_session(ort, PROBE_MODEL, opts, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as e:
        return False, f"onnxruntime's CUDA provider failed to start ({type(e).__name__}: {e}); {CUDA_HINT}"
    if not _cuda_active(session):
        return False, ("onnxruntime lists CUDAExecutionProvider but could not start it (it fell back to the CPU; "
                       f"its log above says which library is missing); {CUDA_HINT}")
    return True, "onnxruntime CUDAExecutionProvider starts"


def share_threads(threads: int | None = None) -> int:
    """Run every onnxruntime session this process makes on one shared pool of intra-op threads
    (onnxruntime's global thread pool) instead of a pool per session.

    Each session's own pool spins for a while after its Run (onnxruntime's default, which keeps a lone
    caller's latency low), so when a process runs one graph after another (the fused graph, then the text
    graph for the items without a photo) the pools spin against each other on the same cores. That is why,
    with pools per session, the small word-CNN text graph runs on one thread, cut by rows (`graph_row_parts`).
    One shared pool has no such neighbour, so text batches run whole on all of its threads: on a 2-core Intel
    Xeon, titles alone took 0.76-0.81x the time and the rest 0.96-1.02x for a caller classifying one batch after
    another (README, "Title-only classification"; benchmarks/experiments/text_session_pools.py). Beside other busy
    threads (`huse serve`'s decoding pool) its spinning competes with them: the server answered 4-7% fewer requests.

    Call it once, before the process's first onnxruntime session (`huse-bench run --shared-threads` does).
    Then every onnxruntime session in the process must use the shared pool (onnxruntime refuses the others),
    so call it only in a process whose sessions huse makes. The pool spins (onnxruntime's default): a
    Classifier's `threads`, `row_parts` and `spinning` no longer apply to its sessions.

    Args:
        threads: the pool's intra-op threads (None: one per core).
    Returns:
        The pool's size.
    Raises:
        HuseError: this process has made an onnxruntime session already, or shares a pool already.
    """
    global _shared_threads
    if _shared_threads is not None:
        raise HuseError(f"this process already shares one pool of {_shared_threads} onnxruntime threads")
    if _made_a_session:
        raise HuseError("share_threads must come before the process's first onnxruntime session "
                        "(call it before the first Classifier runs a graph)")
    size = int(threads or os.cpu_count() or 1)
    state = lazy_import("onnxruntime.capi._pybind_state", "ort")
    try:
        state.set_global_thread_pool_sizes(size, 1)
    except Exception as e:
        raise HuseError(f"onnxruntime could not share one thread pool ({e})") from None
    _shared_threads = size
    return size


def graph_threads(graph: str, text_encoder: str | None, threads: int | None) -> int | None:
    """Intra-op threads for one bundle graph's session: each graph's own, not one setting for all.

    The word-CNN text graph is a few small ops per title (after export folds the embedding into the
    convolution, a Gather per kernel tap and three Gemms): handing each op to a second thread costs
    more than the op. Measured on 2 cores, batch 64, spinning off, interleaved rounds: the folded graph
    on 1 thread took 0.86x the time it took on 2 (the Conv form it replaced: 1.53 vs 2.36 ms). With
    spinning on, a session of its own on every core runs titles alone faster on some machines (a 2-core
    Intel Xeon: 0.74x the time at batch 1, 0.80x at 64), but its threads spin after each Run against the
    next graph's: a batch with and without photos then took 1.82x the time (`share_threads`, which avoids both). The image,
    fused and MiniLM text graphs have the arithmetic to share, so they get `threads` (None: all cores).
    Graph optimisation stays at ORT_ENABLE_ALL and execution sequential for every graph. The fused graph's
    image and text branches could run at once under the parallel executor (ORT_PARALLEL), but it took
    1.12-3.44x the sequential time at batch 1, 8 and 64, fp32 and int8-cpu, word CNN and MiniLM, with 2
    inter-op threads and 1 or all intra-op threads (benchmarks/experiments/fused_branches.py,
    results/cpu-2core/fused-branches): the larger branch alone on one core takes longer than both
    branches in turn on two cores, and with all intra-op threads as well the cores are oversubscribed.

    Args:
        graph: "image", "text" or "fused".
        text_encoder: the bundle's text encoder ("cnn", "minilm"; None when the manifest predates it).
        threads: what the caller asked for (None: onnxruntime's default, every core).
    """
    if graph == "text" and text_encoder in (None, "cnn"):
        return 1
    return threads


def graph_row_parts(graph: str, text_encoder: str | None, threads: int | None) -> int:
    """Into how many parts a batch of one bundle graph is cut by rows, run at the same time on one session.

    A text batch is small work split into many small ops: onnxruntime's intra-op threads hand off at
    every op (so the word-CNN graph runs on one, `graph_threads`), and PyTorch uses every core. Cutting
    the batch by rows and running the parts concurrently (one Run per part; Run releases the GIL)
    uses every core with one hand-off per batch. Measured on 2 shared cores, batch 64, interleaved
    rounds: word CNN, 2 parts on one intra-op thread took 0.51-0.65x the time of the whole batch on
    one thread and 0.54-0.80x the whole batch on two; on an idle machine 0.87x (0.66-1.25) the
    whole batch on two (benchmarks/experiments/text_graph_options.py, results/cpu-2core/text-options).
    MiniLM: 1 part. Its matmuls already keep both cores busy; cut in two on its 2-thread session it
    took 1.22x (1.11-1.26) the whole batch on an idle machine, and on 1-thread sessions 1.01x.
    In a process that shares one pool (`share_threads`): 1 part, whole batches on the pool's threads.
    Rows are independent in these graphs, so the outputs are the whole batch's. Image and fused
    graphs: 1 (their convolutions keep both cores busy already).

    Args:
        graph: "image", "text" or "fused".
        text_encoder: the bundle's text encoder ("cnn", "minilm"; None when the manifest predates it).
        threads: what the caller asked for (None: every core).
    Returns:
        The number of parts (1: whole batches).
    """
    if graph == "text" and text_encoder != "minilm" and _shared_threads is None:
        return int(threads or os.cpu_count() or 1)
    return 1


def onnx_files(models: dict[str, dict[str, str]], precision: str, graph: str, device: str = "cpu") -> tuple[str, str | None]:
    """The ONNX file onnxruntime loads for one graph of a bundle, and the file whose weights replace its own.

    An FP16 graph on a CPU runs as the float32 graph with the FP16 graph's weights (`OnnxrtRunner(weights=)`).
    onnxruntime has no float16 kernels on x86: it runs float32 kernels behind Casts. On an Arm CPU with
    float16 arithmetic it runs the float16 graph in float16 (33 of the demo image graph's 49 convolutions
    as fp16 NhwcFusedConv), whose scores moved by up to 0.033 and flipped 2 of 200 products against x86
    (`make arm64-check`, README "Arm64"). Float16 weights in float32 arithmetic give every CPU the same
    answers, and the export's FP16 gate measures that. On a GPU the FP16 graph runs as it is.

    Args:
        models: the manifest's "models" (precision -> graph -> file, relative to the bundle).
        precision, graph, device: what is to run, and where ("cpu" or "cuda").
    Returns:
        (the file to load, the FP16 file whose weights replace its own or None), relative to the bundle.
    """
    path = models[precision][graph]
    if precision == "fp16" and device == "cpu":
        return models["fp32"][graph], path
    return path, None


class OnnxrtRunner(BaseRunner):
    """Runs an ONNX file with onnxruntime.

    Args:
        path: the .onnx file.
        device: "cpu" or "cuda" (CUDAExecutionProvider, CPU fallback for unsupported ops).
        threads: intra-op threads; None lets onnxruntime use every core.
        spinning: intra-op threads spin while waiting for work (None: onnxruntime's default, on).
            Off when other threads share the cores: measured on 2 cores with a busy neighbour,
            1,555 items/s off vs 1,063 on (alone: 2,324 vs 2,433).
        row_parts: cut a batch of at least 2 x MIN_ROWS_PER_PART rows into up to this many parts by
            rows and run them at the same time (`graph_row_parts`); 1: whole batches.
        weights: an FP16 copy of this graph (same nodes and initializer names) whose float16 weights
            replace this graph's, in float32 (`onnx_files`): an FP16 bundle on a CPU.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 spinning: bool | None = None, row_parts: int = 1, weights: str | Path | None = None):
        super().__init__(path)
        self.device = device
        self.threads = threads
        self.spinning = spinning
        self.row_parts = max(1, int(row_parts))
        self.weights = weights
        self.session = None
        self._pool: ThreadPoolExecutor | None = None

    def activate_impl(self) -> None:
        ort = lazy_import("onnxruntime", "ort")
        opts = ort.SessionOptions()
        # Full graph optimisation: ORT_DISABLE_ALL is 2-3x slower on these models.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if _shared_threads is None:  # else the process's one pool (`share_threads`) has its own settings
            if self.threads:
                opts.intra_op_num_threads = int(self.threads)
            if self.spinning is not None:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        model: str | bytes = str(self.path)
        if self.weights is not None:  # an FP16 bundle on a CPU: the float32 graph with the float16 weights
            from huse.runtime.backends.onnxrt.weights import float32_model_with_float16_weights

            model = float32_model_with_float16_weights(self.path, self.weights)
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise HuseError("onnxruntime has no CUDA provider here; install onnxruntime-gpu "
                                "or use device='cpu'")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = _new_session(ort, model, opts, providers)
        except Exception as e:
            raise HuseError(f"onnxruntime could not load {self.path} ({e})") from None
        if self.device == "cuda" and not _cuda_active(session):
            # onnxruntime falls back to the CPU without raising; running on, every number
            # reported as "cuda" would be a CPU number.
            raise HuseError(f"onnxruntime could not start its CUDA provider for {self.path} "
                            f"(providers in use: {session.get_providers()}); {CUDA_HINT}")
        self.session = session
        if self.row_parts > 1 and self.device == "cpu":  # the calling thread runs the first part, the pool the others
            self._pool = ThreadPoolExecutor(self.row_parts - 1, thread_name_prefix="huse-ort-rows")

    def deactivate_impl(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.session = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(feed.values())))
        parts = min(self.row_parts, rows // MIN_ROWS_PER_PART)
        if parts < 2 or self._pool is None:
            return dict(zip(self.output_names, self.session.run(None, feed)))
        cuts = [rows * i // parts for i in range(parts + 1)]  # integer arithmetic: np.linspace costs ~5 us a call
        feeds = [{k: v[a:b] for k, v in feed.items()} for a, b in zip(cuts, cuts[1:])]
        others = [self._pool.submit(self.session.run, None, f) for f in feeds[1:]]
        outs = [self.session.run(None, feeds[0])] + [f.result() for f in others]
        return {name: np.concatenate([o[i] for o in outs]) for i, name in enumerate(self.output_names)}
