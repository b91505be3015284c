"""`python -m benchmarks`: the same as `sipfarm bench` (see benchmarks/harness.py)."""

from benchmarks.harness import main

raise SystemExit(main())
