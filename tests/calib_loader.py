"""``load_calibration`` in a worker process with a timeout: a file that hangs the loader fails a test, not CI.

A thread with ``join(timeout)`` is not enough: a native extension blocked in ``open()`` (a FIFO) keeps the GIL,
so the whole test process would hang. The worker answers one JSON line per path.
"""

import json
import selectors
import subprocess
import sys

WORKER = r"""
import json, sys
import torch
import qdrift

for line in sys.stdin:
    path = json.loads(line)
    try:
        cal = qdrift.load_calibration(path)
        merged = cal.merge(cal)  # the metadata must also survive use, not only loading
        v = cal.at(torch.cat([cal.sigmas, torch.zeros(1, dtype=torch.float64)]))
        out = {"ok": True, "finite": bool(torch.isfinite(v).all()), "shape": list(v.shape),
               "K": merged.meta.get("K"), "channels": cal.channels}
    except qdrift.CalibrationFileError as e:
        out = {"ok": False, "type": type(e).__name__, "message": str(e),
               "is_file_not_found": isinstance(e, FileNotFoundError)}
    except BaseException as e:  # anything else is a bug the tests report
        out = {"ok": False, "type": "unexpected " + type(e).__name__, "message": repr(e)[:400]}
    print(json.dumps(out), flush=True)
"""


class Loader:
    """A persistent worker process that loads calibration files; :meth:`load` gives up after ``timeout``."""

    def __init__(self):
        self.proc = None
        self._start()

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def load(self, path, timeout: float = 30.0) -> dict:
        """The worker's answer for ``path``; raises ``TimeoutError`` (and restarts the worker) on a hang."""
        self.proc.stdin.write(json.dumps(str(path)) + "\n")
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        if not ready:
            self.close()
            self._start()
            raise TimeoutError(f"load_calibration({str(path)!r}) did not return within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self._start()
            raise RuntimeError(f"the loader worker died (exit {code}) on {path}")
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
