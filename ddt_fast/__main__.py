import sys

from ddt_fast.cli import main

sys.exit(main())
