"""A real ``vram-residency serve`` (the CLI's own ``main``, every option as given) with one
test-only addition, outside the product: SIGUSR1 flips one bit of the committed shard's memory
through ``vram_residency.testing.flip_bit``, behind the seal's back, as a rowhammer flip would.
Only the process itself can reach its (emulated) device memory, hence this wrapper.

Usage: python serve_fault_child.py serve --backend host ...   (prints "FLIPPED" once done)
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from vram_residency.cli.main import main
from vram_residency.service import server
from vram_residency.testing import flip_bit

_built: list[server.Built] = []
_real_build = server.build


def _build(opts: server.ServeOptions) -> server.Built:
    # cli/serve.py imports build from the module when serve runs: this wrapper is what it gets.
    built = _real_build(opts)
    _built.append(built)
    return built


_go = threading.Event()


def _flipper() -> None:
    _go.wait()
    mgr = _built[0].worker.manager
    (shard,) = mgr.shards()
    flip_bit(mgr, shard, 12345)
    print("FLIPPED", flush=True)


def _on_usr1(signum: int, frame: FrameType | None) -> None:
    _go.set()  # the flip itself runs on a thread: it takes the shard's lock


if __name__ == "__main__":
    server.build = _build
    signal.signal(signal.SIGUSR1, _on_usr1)
    threading.Thread(target=_flipper, name="test-flipper", daemon=True).start()
    sys.exit(main(sys.argv[1:]))
