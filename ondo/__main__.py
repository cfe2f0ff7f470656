import sys

from ondo.cli import main

sys.exit(main())
