"""Shared pytest setup: repo root importable, `slow` marker registered."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: slower test (still run in CI; keep under ~3 min)")
