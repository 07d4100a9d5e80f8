"""Child processes that end with their parent, however the parent ends.

The local stack (services/stack.py) starts the broker and every service as child processes. A
parent that stops cleanly stops them itself; one killed with -9 cannot, so each child is started
under util-linux `setpriv --pdeathsig TERM`, which sets the kernel's parent-death signal and then
execs the command (same pid): the child gets SIGTERM, and stops gracefully, the moment its
parent is gone. Where `setpriv` is missing the command runs as is, and the log says so.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence

log = logging.getLogger(__name__)


def ending_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so the child gets SIGTERM when its parent dies (Linux; see the module)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv not found: child processes outlive a parent killed with -9", extra={"argv": argv[0]})
        return list(argv)
    return [setpriv, "--pdeathsig", "TERM", *argv]
