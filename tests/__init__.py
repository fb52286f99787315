"""The test suite: pytest puts the repository root on the path (pyproject.toml), so tests import
`train_gpt`, `tools.NAME` and `tests.helpers` like any other code."""
