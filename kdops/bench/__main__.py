"""``python -m kdops.bench``: see :mod:`kdops.bench.cli`."""
import sys

from kdops.bench.cli import main

sys.exit(main())
