import sys

from shrink.cli import main

sys.exit(main())
