"""Import TensorFlow without the start-up chatter that its C++ logging prints on every run."""

from __future__ import annotations

import os
import sys
import tempfile

# Lines TF prints on import before its log level applies; everything else on stderr is kept.
_NOISE = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",  # the GPU build of TF on a machine without a GPU
    "failed call to cuInit",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)


def quiet_import_tensorflow() -> None:
    """Import tensorflow with stderr captured, then replay every line that is not known noise."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                if not any(noise in line for noise in _NOISE):
                    print(line, file=sys.stderr)
