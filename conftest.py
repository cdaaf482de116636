"""Makes the project's flat modules importable from tests/ under plain `pytest`."""
