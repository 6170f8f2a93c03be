"""``python3 -m guestd``: run the daemon."""
import sys

from .daemon import main

sys.exit(main())
