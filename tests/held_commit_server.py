"""server.py whose SQLite commits after the first HOLD_AFTER_COMMITS are held open forever.

A test seam for the durable-reads test: it runs the real server (`python
tests/held_commit_server.py <server.py flags>`), logs "holding commit N" when a
commit starts to wait, and holds it until the process is killed.
"""

import logging
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import server

logger = logging.getLogger("held_commit")


def hold_commits_after(count):
    """Let count commits through, then hold every later one."""
    save = server.SqliteStore._save
    commits = [0]

    def held_save(store, records):
        commits[0] += 1
        if commits[0] > count:
            logger.warning("holding commit %d", commits[0])
            threading.Event().wait()
        save(store, records)

    server.SqliteStore._save = held_save


if __name__ == "__main__":
    hold_commits_after(int(os.environ["HOLD_AFTER_COMMITS"]))
    sys.exit(server.main())
