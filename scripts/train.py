"""Train from a YAML config: ``python scripts/train.py --config configs/acktr/cartpole.yaml``."""

import sys

from agents.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
