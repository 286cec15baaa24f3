"""Generate with an OpenMoE checkpoint spread over GPUs, CPU memory and disk. See `--help`."""

import sys

from moe_system.inference.cli import multi_device_main

if __name__ == "__main__":
    sys.exit(multi_device_main())
