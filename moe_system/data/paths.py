"""Where the bundled data lives and where generated artifacts (the bundled tokenizer) are cached."""

import os

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")


def cache_root() -> str:
    """$MOE_SYSTEM_CACHE, else ~/.cache/moe_system."""
    return os.environ.get("MOE_SYSTEM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe_system")
