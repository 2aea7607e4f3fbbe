"""FinQA-RL's shared library. Importing it first (before torch) sets the process-wide threading defaults."""
import os

# On a small shared CPU, OpenMP threads that spin while waiting starve every other process (a forward pass
# measured 8x slower with a second busy process); passive waiting costs little when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
