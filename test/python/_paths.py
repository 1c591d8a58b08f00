"""Puts priv/python (the dspex_bridge package) on sys.path for the tests/bench."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG_DIR = os.path.join(ROOT, "priv", "python")
if PKG_DIR not in sys.path:
    sys.path.insert(0, PKG_DIR)
