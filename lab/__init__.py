"""The lab: benchmarks (bench.py), the paper's comparison (experiments.py), their results and NOTEBOOK.md."""
