"""``python3 -m dspex_bridge``: the operator CLI (see dspex_bridge.cli)."""
import sys

from .cli import main

sys.exit(main())
