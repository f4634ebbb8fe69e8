"""Small helpers around the Hugging Face libraries shared by the model modules."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from transformers.utils import logging as hf_logging

# Model loading is not thread-safe in the Hugging Face libraries: accelerate's init_empty_weights
# (diffusers' default low-memory load) patches torch.nn.Module.register_parameter for the whole
# process, and the progress-bar switch below is global too.  A model built in one thread while
# another loads can come out with parameters left on the meta device.  Every selma loader holds
# this lock (through no_progress_bars), so loads in one process run one at a time.
_LOAD_LOCK = threading.RLock()


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Load models inside the block: one loader at a time per process (see ``_LOAD_LOCK``), with
    transformers' progress bars (e.g. "Writing model shards") hidden, then restored."""
    with _LOAD_LOCK:
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
