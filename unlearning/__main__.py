"""python -m unlearning [unlearn|verify] RUN_DIR ...: the same tool as `fl-lab unlearn` / `fl-lab verify`.

Without a subcommand it unlearns: recovers the trigger from RUN_DIR/inversion, fine-tunes the final
model per strategy on the server's clean set and writes RUN_DIR/unlearning/.
"""

import sys

from unlearning.cli import main

if __name__ == "__main__":
    sys.exit(main())
