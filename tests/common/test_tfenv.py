"""oneDNN, devices, thread pools and niceness: set before TensorFlow is imported or runs its first op.

Each process-wide setting is checked in a fresh subprocess that runs a real entry point's `main` with a
spy: an import hook records `TF_ENABLE_ONEDNN_OPTS` when `tensorflow` is first imported, and a wrapper
around `common.tfenv.configure` records whether TF's runtime had started before it was called.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common.errors import UsageError
from common.tfenv import ONEDNN_VAR, Runtime, parse_threads
from tests.helpers import REPO

PROBE = """
import importlib, importlib.abc, json, os, sys
seen = {}

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tensorflow" and "onednn_at_import" not in seen:
            seen["onednn_at_import"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
        return None

sys.meta_path.insert(0, Spy())
from common import tfenv
real_configure = tfenv.configure

def configure(runtime):
    from tensorflow.python.eager import context
    seen["runtime_started_before_configure"] = context.context()._context_handle is not None
    return real_configure(runtime)

tfenv.configure = configure
module, function = sys.argv[1].split(":")
seen["exit"] = getattr(importlib.import_module(module), function)(sys.argv[2:])
import tensorflow as tf
tf.constant(1.0) + 1.0  # start the runtime and its thread pools, as a first model op would
seen["intra"] = tf.config.threading.get_intra_op_parallelism_threads()
seen["inter"] = tf.config.threading.get_inter_op_parallelism_threads()
seen["nice_main"] = os.getpriority(os.PRIO_PROCESS, 0)
seen["nice_by_thread"] = sorted(os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task"))
seen["visible_gpus"] = len(tf.config.get_visible_devices("GPU"))
seen["onednn"] = tfenv.onednn_enabled()
print(json.dumps(seen))
"""


def probe(entry: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Run `entry` (module:function) with `args` under the spy; return its record and its stderr."""
    base = {k: v for k, v in os.environ.items() if k != ONEDNN_VAR}
    out = subprocess.run([sys.executable, "-c", PROBE, entry, *args], capture_output=True, text=True, cwd=REPO,
                         env=base | (env or {}), timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_parse_threads() -> None:
    assert parse_threads("auto") == (0, 0)
    assert parse_threads("4") == (4, 0)
    assert parse_threads("4,2") == (4, 2)
    for bad in ("x", "-1", "1,2,3", "1.5", ""):
        with pytest.raises(UsageError, match="--threads"):
            parse_threads(bad)


def test_runtime_rejects_bad_values_by_name() -> None:
    with pytest.raises(UsageError, match="'tpu'"):
        Runtime(device="tpu")
    with pytest.raises(UsageError, match="--nice \\(20\\)"):
        Runtime(nice=20)
    assert Runtime.from_flags(device="cpu", threads="3,1", nice=5) == Runtime("cpu", 3, 1, 5)


@pytest.mark.slow
def test_trainer_turns_onednn_on_and_sets_threads_before_any_op(tmp_path: Path) -> None:
    rec, _ = probe("trainer.cli:main", "--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "none"),
                   "--threads", "3,2")
    assert rec["exit"] == 4  # no data there: it failed after TF was set up, which is all this needs
    assert rec["onednn_at_import"] == "1" and rec["onednn"] in (True, None)
    assert rec["runtime_started_before_configure"] is False
    assert (rec["intra"], rec["inter"]) == (3, 2)
    assert set(rec["nice_by_thread"]) == {os.getpriority(os.PRIO_PROCESS, 0)}  # the trainer keeps the shell's


@pytest.mark.slow
def test_evaluator_flags_apply_before_any_op(tmp_path: Path) -> None:
    rec, err = probe("evaluator.cli:main", "--workdir", str(tmp_path), "--once", "--device", "cpu",
                     "--threads", "1,1", "--nice", "7")
    assert rec["exit"] == 2 and "no run.json" in err  # an empty folder: it failed after TF was set up
    assert rec["onednn_at_import"] == "1"
    assert rec["runtime_started_before_configure"] is False
    assert (rec["intra"], rec["inter"]) == (1, 1)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert rec["nice_main"] == base  # the watch loop notices commits at the shell's priority
    assert rec["nice_by_thread"].count(max(7, base)) >= 2  # TF's op thread pools compute at nice 7
    assert rec["visible_gpus"] == 0


@pytest.mark.slow
def test_evaluator_defaults_are_nice_10_and_any_device(tmp_path: Path) -> None:
    rec, _ = probe("evaluator.cli:main", "--workdir", str(tmp_path), "--once")
    assert rec["exit"] == 2
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert rec["nice_main"] == base and rec["nice_by_thread"].count(max(10, base)) >= 2
    assert (rec["intra"], rec["inter"]) == (0, 0)  # TF's choice
    assert rec["runtime_started_before_configure"] is False


@pytest.mark.slow
def test_device_gpu_without_one_is_a_one_line_error_and_a_user_onednn_setting_is_kept(tmp_path: Path) -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    rec, err = probe("evaluator.cli:main", "--workdir", str(tmp_path), "--once", "--device", "gpu",
                     env={ONEDNN_VAR: "0"})
    assert rec["exit"] == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("evaluator: error: --device gpu:"), err
    assert rec["onednn_at_import"] == "0" and rec["onednn"] in (False, None)


@pytest.mark.slow
def test_predict_turns_onednn_on_before_import(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"not a png")
    rec, _ = probe("evaluator.serving.predict:main", "--model", str(tmp_path / "missing"), str(image))
    assert rec["exit"] == 2
    assert rec["onednn_at_import"] == "1"


KERAS_PROBE = """
import json, sys
from common.tfenv import quiet_import_tensorflow
quiet_import_tensorflow()
seen = {"keras_at_start": "keras" in sys.modules, "matplotlib_at_start": "matplotlib" in sys.modules}
import keras
import tensorflow as tf
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
seen["outputs"] = list(model(tf.zeros((1, 3))).shape)
seen["tf_keras_is_keras"] = tf.keras.layers.Dense is keras.layers.Dense
seen["optimizer"] = type(keras.optimizers.Adam()).__name__
print(json.dumps(seen))
"""


def test_tensorflow_starts_without_keras_and_keras_loads_on_first_use() -> None:
    out = subprocess.run([sys.executable, "-c", KERAS_PROBE], capture_output=True, text=True, cwd=REPO, check=True,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"keras_at_start": False, "matplotlib_at_start": False, "outputs": [1, 2],
                    "tf_keras_is_keras": True, "optimizer": "Adam"}
