"""The package version: the dspex_bridge application's vsn (src/dspex_bridge.app.src; a test checks they agree)."""
__version__ = "0.1.0"
