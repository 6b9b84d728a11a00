import sys

from ckfs_protos.generate import main

sys.exit(main())
