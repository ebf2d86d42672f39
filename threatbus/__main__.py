import sys

from threatbus.cli import main

sys.exit(main())
