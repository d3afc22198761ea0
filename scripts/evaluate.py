"""Evaluate a checkpoint: ``python scripts/evaluate.py runs/<run>/last.pt --episodes 10``."""

import sys

from agents.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
