"""A SIGTERM (a scheduler's preemption, ``kill``) as an exception in purify's own commands.

SIGTERM's default action ends the process at once: ``finally`` blocks do not run, so a half-built cache entry stays
behind as a temporary directory, forked benchmark workers run on as orphans, and the shell sees exit 143 without a
word. Within :func:`sigterm_stops` the signal raises :class:`~purify.types.TrainingStopped` instead, which unwinds
like Ctrl-C and ends the command with one ``purify: error:`` line and exit 143. ``purify train`` uses it before
training only (the models built, the resume checked, the data read): from the fit on, its own handler
(:func:`purify.train._sigterm_raises`) and Lightning's stop the run at a step's end.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

from purify.types import TrainingStopped


@contextlib.contextmanager
def sigterm_stops(after: str, report: bool = True) -> Iterator[None]:
    """Within: SIGTERM raises :class:`~purify.types.TrainingStopped` (``"stopped by SIGTERM: <after>"``, exit code
    143); the previous handler comes back after. Outside the main thread (where Python takes no signals) nothing
    changes.

    Args:
        after: what the message says after ``stopped by SIGTERM:`` (what was left undone and how to go on).
        report: whether this process says it (a multi-process launch's first; the others stop with the same code).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> NoReturn:
        raise _Stop(f"stopped by {signal.Signals(signum).name}: {after}", 128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except _Stop as stopped:
        raise TrainingStopped(*stopped.args, report=report) from None
    finally:
        signal.signal(signal.SIGTERM, before)


class _Stop(BaseException):
    """The signal on its way out of :func:`sigterm_stops`' block: a ``BaseException``, as ``KeyboardInterrupt`` is, so
    the ``except Exception`` of whatever code it lands in (a GGUF conversion's, which made it a conversion error, exit
    2) lets it through; it leaves the block as :class:`~purify.types.TrainingStopped`."""
