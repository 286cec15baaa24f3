"""Worker: train.py's entry point, with rank 1 given another --output_path than the others, as a rank on a node
whose disk holds a different directory at that path would see it.

Usage: torchrun --nproc_per_node N tests/workers/per_rank_output_path.py RANK1_OUTPUT_PATH [train.py args ...]
"""

import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

rank1_path, argv = sys.argv[1], sys.argv[2:]
if os.environ.get("RANK") == "1":
    argv[argv.index("--output_path") + 1] = rank1_path
sys.argv = [os.path.join(REPO, "train.py"), *argv]
runpy.run_path(sys.argv[0], run_name="__main__")
