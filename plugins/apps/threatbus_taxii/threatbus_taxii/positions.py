"""Where polling stopped: the ``added_after`` position of each TAXII collection, kept on disk.

One small JSON file in ``state_dir``, replaced atomically (written to a
temporary file, flushed to disk, renamed over the old one), so a crash
leaves either the old or the new positions, never a torn file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from threatbus.errors import PluginError

logger = logging.getLogger(__name__)

FILE_NAME = "positions.json"
FORMAT_VERSION = 1


class PositionStore:
    """``added_after`` per collection URL; ``set`` writes through to disk."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._positions: dict[str, str] = {}

    def load(self) -> None:
        """Read the positions; raises ``PluginError`` when the directory or file is unusable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PluginError(f"cannot create the TAXII state directory {str(self.path.parent)!r}: {err}") from err
        if not self.path.exists():
            logger.info("no TAXII positions in %s yet: collections are read from their start", self.path)
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            positions = data["collections"]
            if data.get("version") != FORMAT_VERSION or not isinstance(positions, dict):
                raise ValueError(f"unknown format {data.get('version')!r}")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in positions.items()):
                raise ValueError("positions must be strings")
        except (OSError, ValueError, KeyError, TypeError) as err:
            # Starting over would publish every collection again: let the operator decide.
            raise PluginError(
                f"cannot read TAXII positions from {str(self.path)!r}: {err}; fix or remove the file"
            ) from err
        with self._lock:
            self._positions = dict(positions)
        logger.info("TAXII positions loaded from %s: %d collections", self.path, len(positions))

    def get(self, collection_url: str) -> str | None:
        with self._lock:
            return self._positions.get(collection_url)

    def set(self, collection_url: str, added_after: str) -> None:
        """Remember a position and write all positions to disk before returning."""
        with self._lock:
            if self._positions.get(collection_url) == added_after:
                return
            self._positions[collection_url] = added_after
            self._write({"version": FORMAT_VERSION, "collections": dict(self._positions)})

    def _write(self, data: dict[str, object]) -> None:
        directory = self.path.parent
        fd, temporary = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        # The rename itself is durable only once the directory is synced.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
