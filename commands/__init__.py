"""The commands behind the Makefile's targets: sweep, tune, compare, reproduce, warm (and cold), the
model server (make serve, make promote) and the team tracking server (make server). Each is
`python -m commands.<name> --help`. They run the pipeline's stages through DVC; no stage imports them.

Importing the package changes nothing. Started as `python -m commands.<name>`, the process applies
the pipeline's defaults here, before the command's own imports (pipeline/runtime.py says why).
"""

from pipeline import runtime

if (_module := runtime.main_module()) and _module.startswith(f"{__name__}."):
    runtime.start(_module)
