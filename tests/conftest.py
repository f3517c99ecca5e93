"""Shared pytest setup: make the repository root importable (protocols, vhost, devices) when
pytest is run as plain `pytest` rather than `python -m pytest` from the root."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
