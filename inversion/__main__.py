"""python -m inversion RUN_DIR [--entry ID ...]: reconstruct client images from captured updates.

Same tool as `fl-lab invert`. Writes RUN_DIR/inversion/<entry>/{recon.safetensors, recon.png,
metrics.json} and prints a table. The attack sees only the capture entry (global weights, update,
the hyperparameters the server sent); the evidence file, when a simulation left one, is used for
scoring, and for the labels only when `--labels known` grants them.
"""

import sys

from inversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
