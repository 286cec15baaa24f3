"""Speed and memory benchmarks: run as modules from the repository root, e.g. `python -m benchmarks.moe_layer --smoke`."""
