"""`python -m benchmarks`: the benchmark suite (see benchmarks/suite.py); with --compare, this tree against a
reference revision side by side (see benchmarks/compare.py)."""

import sys

if "--compare" in sys.argv[1:] or any(a.startswith("--compare=") for a in sys.argv[1:]):
    from .compare import main
else:
    from .suite import main

sys.exit(main())
