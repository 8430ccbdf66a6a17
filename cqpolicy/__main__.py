import sys

from cqpolicy.cli import main

sys.exit(main())
