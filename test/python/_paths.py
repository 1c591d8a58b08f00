"""Where the tests find dspex_bridge: the installed package when
DSPEX_BRIDGE_INSTALLED=1 (what `make test-python` runs, from a fresh venv),
else priv/python of this checkout (after `make python-stubs`)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG_DIR = os.path.join(ROOT, "priv", "python")
if os.environ.get("DSPEX_BRIDGE_INSTALLED") != "1" and PKG_DIR not in sys.path:
    sys.path.insert(0, PKG_DIR)
