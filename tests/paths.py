"""Paths every test module shares: the repository, the tests folder and the demo config (one definition)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
DEMO = REPO / "configs" / "demo.yaml"
