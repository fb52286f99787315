"""Tools around train_gpt.py. Run them from the repository root as modules, for example
`python -m tools.seed_sweep`: the root is then on the path, and `import train_gpt` finds the one
pipeline file with no path manipulation (pytest does the same through pyproject.toml)."""
