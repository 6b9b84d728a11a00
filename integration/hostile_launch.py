"""Run one command and report its own peak RSS, wall time and exit status.

Why a launcher: Linux records a process's peak RSS across ``exec`` and
counts, at the exec, the address space it was forked from. A ckfs started
straight from pytest (hundreds of megabytes, with the hostile suite's
crafted documents) would report pytest's size, not its own. This module
imports nothing heavy, so a command forked from it starts at a few
megabytes and ``os.wait4`` reports what the command itself used.

Usage: ``python hostile_launch.py LIMIT REPORT ADDRESS_SPACE -- ARGV...``;
the command is killed (by its PID) after LIMIT seconds, its address space
is capped at ADDRESS_SPACE bytes, and REPORT receives a JSON object
(``code``, ``rss_kib``, ``seconds``, ``killed``). Standard streams are
inherited.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time


def main(argv: list[str]) -> None:
    limit, report, space, sep, *command = argv
    assert sep == "--" and command, "usage: LIMIT REPORT ADDRESS_SPACE -- ARGV..."
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            resource.setrlimit(resource.RLIMIT_AS, (int(space), int(space)))
            os.execv(command[0], command)
        finally:
            os._exit(127)
    killed = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if not killed and time.monotonic() - start > float(limit):
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.005)
    outcome = {
        "code": os.waitstatus_to_exitcode(status),
        "rss_kib": usage.ru_maxrss,
        "seconds": time.monotonic() - start,
        "killed": killed,
    }
    with open(report, "w") as f:
        json.dump(outcome, f)


if __name__ == "__main__":
    main(sys.argv[1:])
