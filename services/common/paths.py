"""Where vmgrid's published contract (the hand-written WSDL and schemas) lives."""
from __future__ import annotations

from pathlib import Path

WSDL_DIR = Path(__file__).resolve().parents[2] / "wsdl"
