"""``python -m d2mae`` (and ``torchrun -m d2mae``) runs the command line."""

import sys

from d2mae.commands.main import main

sys.exit(main())
