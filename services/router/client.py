"""python -m services.router.client: the in-repository name of the `adaccel-client` command.

The client lives in clients/python (package adaccel-client, `pip install clients/python`); this
runs the same command from a checkout, with the stubs of `make protos`. Same arguments:

    python -m services.router.client --router 127.0.0.1:50051 --pool-key electronics/audio \\
        --block instruction:instr-1:"Write the selling points of this item." \\
        --block item:item-42:"Aurora headphones, wireless." --max-new-tokens 48
"""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"


def main(argv: list[str] | None = None) -> int:
    try:
        from adaccel_client.cli import main as client_main
    except ModuleNotFoundError as exc:
        if exc.name != "adaccel_client" or not CLIENT_SRC.is_dir():
            print(f"error: the client package is missing ({exc}); pip install clients/python",
                  file=sys.stderr)
            return 2
        sys.path.insert(0, str(CLIENT_SRC))  # a checkout: the package's source, on the stubs of `make protos`
        from adaccel_client.cli import main as client_main
    return client_main(argv, prog="python -m services.router.client")


if __name__ == "__main__":
    sys.exit(main())
