"""Test-only: record every file a process opens under a watched folder.

Put this folder on PYTHONPATH with FL_CI_OPEN_LOG (the log file), FL_CI_OPEN_WATCH
(the folder) and FL_CI_OPEN_WHO (who this process is) set; Python imports
`sitecustomize` at start-up in every process, so the Flower processes and the
ServerApp/ClientApp processes they start all report: one line "WHO<TAB>path" per
open (Python's `open` audit event: open(), io.open_code, os.open).
"""

import os
import sys

_LOG = os.environ.get("FL_CI_OPEN_LOG")
_WATCH = os.environ.get("FL_CI_OPEN_WATCH")
_WHO = os.environ.get("FL_CI_OPEN_WHO", "?")

if _LOG and _WATCH:
    _FD = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _ROOT = os.path.realpath(_WATCH)

    def _record(event, args):
        if event != "open" or not args or isinstance(args[0], int):
            return
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path.startswith(_ROOT):
            os.write(_FD, f"{_WHO}\t{path}\n".encode())

    sys.addaudithook(_record)
