import sys

from textune.cli import main

sys.exit(main())
