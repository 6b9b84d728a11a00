"""``python -m ckfsd``, as the console script."""

from ckfsd.main import main

main()
