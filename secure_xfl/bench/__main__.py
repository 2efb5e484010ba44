"""``python -m secure_xfl.bench``: same as ``secure-xfl bench``."""

import sys

from secure_xfl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
