"""Kill drills: stop the process dead at a named point, to prove a rerun recovers.

``SYNTHFACTORY_CRASH_AT=<point>`` makes the process SIGKILL itself when it reaches that
point (no clean-up, no finally blocks: what a preempted node or the OOM killer does).
Points: ``validate`` (gate evaluated, nothing written), ``pushed`` (data in S3, not yet
committed), ``committed`` (release commit made, not yet tagged), ``tagged`` (tagged, the
clean-up not done), ``swapping`` (one release entry swapped into data/, the rest not).
"""

from __future__ import annotations

import os
import signal

CRASH_VAR = "SYNTHFACTORY_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
