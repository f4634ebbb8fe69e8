"""Logging set-up for selma processes: one call in ``main()``, text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines (Loki, Cloud Logging)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now*, not the object it was when configured.

    Test runners and embedding applications swap ``sys.stderr``; a handler holding the old
    object would later write to a closed stream.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once; repeated calls replace the handler instead of stacking."""
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_third_party()


class _DropMessages(logging.Filter):
    """Drops third-party log records that are known noise here (say why at the call site)."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


# The transformers logger that warns, on every diffusers import, that torchvision is missing.
_TORCHVISION_NOISE_LOGGER = "transformers.utils.import_utils"


def quiet_third_party() -> None:
    """Silence warnings that say nothing to a selma user.

    transformers warns on every diffusers import that torchvision is missing and it falls back
    to PIL image processors; selma never uses those processors (and torchvision cannot be
    installed beside the CPU torch wheel), so the warning is pure noise in service logs.

    The filter sits on the one logger that emits it (``logging.getLogger`` is the same object
    transformers' ``get_logger`` returns), so nothing of transformers is imported here: a client
    command that never loads a model never pays for transformers.  Repeated calls add it once.
    """
    logger = logging.getLogger(_TORCHVISION_NOISE_LOGGER)
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages("requires torchvision (not installed)"))
