"""Entry point of a model process (service/runner/process.py):
`python -m service.runner.process_main FD PARENT_PID FLAGS_FD` (the plain start; service/runner/forkserver.py
forks most model processes instead).

Kept free of heavy imports so that the watchdog runs before torch and transformers load (seconds): a
parent killed while its child is still importing or loading must not leave the child behind. A closed
socket would tell a waiting child, but not one busy loading or running a batch; the watchdog notices the
re-parenting within PARENT_POLL_S and ends the process there and then. The parent's pid comes on the
command line: a parent killed before this line runs has already handed the child to another process.
"""

from __future__ import annotations

import os
import sys
import threading
import time

PARENT_POLL_S = 0.5


def exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


if __name__ == "__main__":
    exit_with_parent(int(sys.argv[2]))
    from multiprocessing.connection import Connection

    from service.runner.process import child_main

    child_main(Connection(int(sys.argv[1])), int(sys.argv[3]))
