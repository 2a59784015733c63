"""`python -m benchmarks`: exit status 1 where a measured figure misses its target."""
import sys

from benchmarks.harness import main

if __name__ == "__main__":
    sys.exit(main())
