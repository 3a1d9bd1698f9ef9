"""The program's entry (`python -m fasttrain`, the `fasttrain` script): main(), then a quick exit.

Kept apart from fasttrain.cli so that a Ctrl-C while the command line's imports load (torch takes
seconds) ends in one line, not a KeyboardInterrupt traceback.
"""

import sys


def run() -> int:
    """Exit code of `fasttrain.cli.main` on sys.argv; 130 for a Ctrl-C during imports.

    When main() returns, everything a run writes is flushed and closed. What is left is the
    interpreter's shutdown over torch's objects: 0.80 s on the 2-core CI machine, 0.19 s after
    gc.freeze() (benchmarks/run_time_check.py), time after summary.json's wall clock that nothing
    would account for. gc.freeze() exempts the objects alive now from the final collection; their
    memory goes back as the process ends, and the loaders' pipelines were released by the session.
    """
    try:
        from fasttrain.cli import main
    except KeyboardInterrupt:
        print("stopped (Ctrl-C) while starting; nothing was done", file=sys.stderr)
        return 130
    import gc
    import os
    import threading

    code = main()
    if any(t.name == "fasttrain-writer" and t.is_alive() for t in threading.enumerate()):
        # stopped at once (a second Ctrl-C) while the writer thread was inside torch.save: letting
        # the interpreter finalise under it aborts the process (SIGABRT) once the thread next
        # needs Python. End here instead; its temporary file was removed (cli.run_train).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    gc.freeze()
    return code
