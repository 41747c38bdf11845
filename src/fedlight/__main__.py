import sys

from fedlight.config_guard import drop_cwd_from_path

drop_cwd_from_path()  # with -m, sys.path[0] is the current directory: a config must not import from it

from fedlight.cli import main  # noqa: E402 - after the path is cleaned, on purpose

sys.exit(main())
