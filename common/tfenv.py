"""Import TensorFlow quietly with oneDNN on, then set devices, threads and priority before any op runs.

Both programs call `quiet_import_tensorflow()` and then `configure(Runtime(...))` before they build a
model: TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once, at import, and refuses device and thread-pool
settings once its runtime has started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import UsageError

ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"
DEVICES = ("auto", "cpu", "gpu")
MAX_NICE = 19

# Lines TF prints on import (and at its first look for a GPU) before its log level applies;
# everything else on stderr is kept.
_NOISE = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",  # the GPU build of TF on a machine without a GPU
    "failed call to cuInit",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Capture file descriptor 2 (C++ logging writes there directly), then replay all but the known noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                if not any(noise in line for noise in _NOISE):
                    print(line, file=sys.stderr)


def quiet_import_tensorflow() -> None:
    """Import tensorflow with oneDNN on (unless the user chose), replaying every stderr line but known noise."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF turns its oneDNN kernels on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX. On an AVX2-only
    # AMD EPYC (Zen 3) our trainer ran 2.6x faster with them (3,270-3,481 against 1,279-1,297 images/s).
    # TF reads the variable once, at import; a value the user set, 0 included, is kept.
    os.environ.setdefault(ONEDNN_VAR, "1")
    with _quiet_stderr(), _keras_on_first_use():
        import tensorflow  # noqa: F401


# TF's own `__init__` imports Keras eagerly (`keras.src.optimizers`, which pulls in matplotlib): 0.9 s
# of CPU in a 4.8 s import on two cores (`python -c "import tensorflow"`, 3.4-4.0 s without it), paid by
# every start of a program, although none of them uses Keras itself. TF skips that import when it
# raises ImportError, and Keras then loads on first use: `import keras` in a user's model, or `tf.keras`.
_KERAS_EAGER_IMPORT = "keras.src.optimizers"


@contextlib.contextmanager
def _keras_on_first_use() -> Iterator[None]:
    """While TF imports, make its eager import of Keras raise ImportError; then let Keras import normally."""
    if _KERAS_EAGER_IMPORT in sys.modules:
        yield
        return
    sys.modules[_KERAS_EAGER_IMPORT] = None  # type: ignore[assignment]  # the import system's "cannot import"
    try:
        yield
    finally:
        if _KERAS_EAGER_IMPORT in sys.modules and sys.modules[_KERAS_EAGER_IMPORT] is None:
            del sys.modules[_KERAS_EAGER_IMPORT]


def onednn_enabled() -> bool | None:
    """Whether TF's oneDNN kernels are on in this process; None when this TF build cannot say."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    probe = getattr(_pywrap_util_port, "IsMklEnabled", None)
    return bool(probe()) if probe is not None else None


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How one process uses the machine; `configure` applies it before TensorFlow runs an op."""

    device: str = "auto"  # auto: a GPU when TF sees one; cpu: hide every GPU; gpu: fail without one
    intra_op_threads: int = 0  # threads that split one op (a convolution, a matmul); 0 = TF's choice, one per core
    inter_op_threads: int = 0  # independent ops run at once; 0 = TF's choice
    nice: int = 0  # TF's compute threads run at least this nice (0-19); higher leaves the CPU to others first
    cpu_devices: int = 0  # split the CPU into this many logical devices (`--strategy mirrored --devices N`); 0 = one

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UsageError(f"--device ({self.device!r}) must be one of: {', '.join(DEVICES)}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name.replace('_', '-')} ({getattr(self, name)}) must not be negative")
        if not 0 <= self.nice <= MAX_NICE:
            raise UsageError(f"--nice ({self.nice}) must be between 0 and {MAX_NICE}")
        if self.cpu_devices < 0:
            raise UsageError(f"--devices ({self.cpu_devices}) must not be negative")

    @classmethod
    def from_flags(cls, *, device: str = "auto", threads: str = "auto", nice: int = 0, cpu_devices: int = 0) -> Runtime:
        """Build from the command-line spelling: `--threads auto`, `--threads 4` or `--threads 4,2`."""
        intra, inter = parse_threads(threads)
        return cls(device=device, intra_op_threads=intra, inter_op_threads=inter, nice=nice, cpu_devices=cpu_devices)


def parse_threads(text: str) -> tuple[int, int]:
    """Parse `auto`, `INTRA` or `INTRA,INTER` into (intra, inter); 0 leaves a pool at TF's choice."""
    if text.strip() == "auto":
        return 0, 0
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise UsageError(f"--threads ({text!r}) must be 'auto', INTRA or INTRA,INTER (non-negative integers)")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `configure` applied, as data (the bench records it beside its figures)."""

    device: str  # "gpu" when TF will place ops on a GPU, else "cpu"
    gpus: tuple[str, ...]  # the visible GPUs, each with memory growth on
    intra_op_threads: int  # 0 = TF's choice
    inter_op_threads: int  # 0 = TF's choice
    nice: int  # the highest niceness among this process's threads afterwards (TF's pools when `nice` was set)
    onednn: bool | None  # None when this TF build cannot say


def configure(runtime: Runtime) -> Setup:
    """Apply `runtime` to this process; call it after `quiet_import_tensorflow` and before any op.

    With `runtime.nice` set it starts TF's runtime itself, as the last step, to lower its threads' priority.

    Raises:
        UsageError: `device="gpu"` and TensorFlow sees no GPU.
        RuntimeError: TensorFlow's runtime has already started (an op ran before this call).
    """
    import tensorflow as tf

    gpus = quiet_gpu_lookup()
    if runtime.device == "gpu" and not gpus:
        raise UsageError("--device gpu: TensorFlow sees no GPU here (no device, driver or CUDA build); "
                         "use --device auto or cpu")
    if runtime.device == "cpu":
        tf.config.set_visible_devices([], "GPU")
        gpus = []
    for gpu in gpus:
        # Without it each process maps nearly all of the GPU's memory at its first op, and the second
        # program of the pair (trainer + evaluator on one GPU) fails to allocate.
        tf.config.experimental.set_memory_growth(gpu, True)
    if runtime.cpu_devices > 1:
        _split_cpu(runtime.cpu_devices)
    if runtime.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(runtime.intra_op_threads)
    if runtime.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(runtime.inter_op_threads)
    if runtime.nice:
        lower_priority(runtime.nice)
    return Setup(device="gpu" if gpus else "cpu", gpus=tuple(g.name for g in gpus),
                 intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
                 inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
                 nice=max(_niceness(t) for t in _thread_ids()), onednn=onednn_enabled())


def quiet_gpu_lookup() -> list[Any]:
    """TensorFlow's GPUs, looked up with stderr filtered (see `_NOISE`).

    The GPU build of TF logs a cuInit failure at its first look for a GPU on a machine without one:
    a program that does not call `configure` calls this before its first op, so that the line never shows.
    """
    import tensorflow as tf

    with _quiet_stderr():
        return list(tf.config.list_physical_devices("GPU"))


def _split_cpu(count: int) -> None:
    """Make `count` logical CPU devices (a `MirroredStrategy` over them checks a multi-device setup on a CPU).

    TF accepts this only before its runtime starts; a process that already has this split (the tests
    configure it once for the whole session) keeps it.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) == count:
        return
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def lower_priority(nice: int) -> None:
    """Start TF's runtime now and raise the threads it creates (its op thread pools) to at least `nice`.

    `configure` calls it last; a program that must make a multi-worker strategy first (TF refuses
    one once its runtime has started) configures with `nice=0` and calls it after.

    Only those: Linux keeps niceness per thread, and a whole evaluator at nice 10 beside a trainer that
    fills every core noticed commits seconds late in a probe. The calling thread, and the watch loop's
    threads it starts later, keep their priority, so a commit is noticed at once; the arithmetic, most
    of which runs in the pools (about three quarters of the CPU time of a conv + matmul `tf.function`
    in a probe), waits for the CPU that the trainer leaves.
    """
    from tensorflow.python.eager import context

    before = _thread_ids()
    context.ensure_initialized()
    for tid in _thread_ids() - before:
        try:
            if _niceness(tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # a thread that ended meanwhile
            continue


def _thread_ids() -> set[int]:
    tasks = Path("/proc/self/task")
    return {int(p.name) for p in tasks.iterdir()} if tasks.is_dir() else {0}


def _niceness(tid: int) -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return os.getpriority(os.PRIO_PROCESS, 0)
