"""`python -m internal_policy.cli ...` (what `torchrun -m` and `accelerate launch -m` run)."""

import sys

from . import main

sys.exit(main())
