"""``python -m kdops.demo``: see :mod:`kdops.demo`."""
from kdops.demo.run import main

main()
