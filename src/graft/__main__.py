"""`python -m graft VERB ...` (also what torchrun launches)."""

import os
import sys

from graft.cli import main

if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: a failing rank's error goes into its summary
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

sys.exit(main())
