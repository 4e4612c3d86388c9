import sys

from tafe.cli import main

sys.exit(main())
