"""Generate text with an OpenMoE checkpoint or preset on one device. See `python infer.py --help`."""

import sys

from moe_system.inference.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main())
