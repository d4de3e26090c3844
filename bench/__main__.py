"""`python -m bench`: see bench/cli.py (or `python -m bench --help`)."""
import os
import sys

from .cli import main

if __name__ == "__main__":
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun rank has said and written everything and shut its process group down; skip the interpreter's
        # teardown, where a gloo thread still being destroyed (torch 2.13) now and then aborts the process
        # ("terminate called without an active exception", SIGABRT) and fails a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
