"""``lssf-lightning``: the entry point. The commands, their options and runners are
:mod:`lssf_lightning.commands`; this module turns every outcome into an exit code and one line.

Errors print one line and exit non-zero; set ``LSSF_LIGHTNING_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit), raised like Ctrl-C so the output guard cleans up."""


# The signal that ended the run, if any. A library may catch the KeyboardInterrupt and raise its own error
# instead (a Ctrl-C inside numpy's import becomes "cannot load module more than once per process" when
# torch imports it again): such an error is still reported as the interruption.
_received: list[int] = []


def _raise_terminated(signum, frame) -> None:
    _received.append(signum)
    raise _Terminated


def _raise_interrupted(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code is 0, 1 (an error, one line on stderr), 2 (usage), 130 (Ctrl-C) or
    143 (SIGTERM).

    The commands (and with them torch) are imported here, after the signal handlers are in place: the one
    deferred import of the package's own code, so a Ctrl-C or ``kill`` at any moment, also while torch is
    still being imported, ends in one line.
    """
    import signal
    import threading

    command = "lssf-lightning"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupted)
    _received.clear()
    try:
        argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
        from lssf_lightning import commands  # after the handlers (see above)

        if argv[:1] and argv[0] in commands.DELEGATED:
            command = argv[0]
            return _guarded(lambda: commands.DELEGATED[argv[0]](argv[1:]), command)
        args = commands.build_parser().parse_args(argv)
        command = args.command
        return _guarded(lambda: commands.RUNNERS[args.command](args), command)
    except KeyboardInterrupt as err:  # while parsing, or between the steps above
        return _interrupted(command, err)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


# Exception types that only a bug raises: reported as an internal error (still one line, with how to get
# more).
_BUGS = (KeyError, AttributeError, IndexError, AssertionError, NameError, ZeroDivisionError)


def _describe(err: BaseException) -> str:
    """One line for ``err``; an ``OSError`` names its path(s) and the system's reason."""
    if isinstance(err, OSError) and err.filename is not None:
        reason = err.strerror or str(err)
        target = f" -> {err.filename2}" if err.filename2 is not None else ""
        text = f"{err.filename}{target}: {reason}"
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    elif isinstance(err, MemoryError):
        text = f"out of memory{': ' + str(err) if str(err) else ''}"
    elif isinstance(err, re.error):
        text = f"invalid regular expression {err.pattern!r}: {err}"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split()).replace("overwrite=True / --overwrite", "--overwrite")  # CLI wording
    if isinstance(err, _BUGS):
        return (
            f"internal error ({type(err).__name__}: {text}); rerun with LSSF_LIGHTNING_DEBUG=1 for the "
            "traceback and please report it"
        )
    return text


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line per warning; only this package's own are labelled ``lssf-lightning: warning:``, others name
    the library that raised them (Lightning's, transformers' …)."""
    text = " ".join(str(message).split())
    parts = os.path.normpath(str(filename)).split(os.sep)
    if "lssf_lightning" in parts:
        print(f"lssf-lightning: warning: {text}", file=sys.stderr)
        return
    owner = parts[parts.index("site-packages") + 1] if "site-packages" in parts[:-1] else parts[-1]
    print(f"{owner}: {category.__name__}: {text}", file=sys.stderr)


def _interrupted(command: str, err: KeyboardInterrupt) -> int:
    what = "terminated" if isinstance(err, _Terminated) else "interrupted"
    print(
        f"{'lssf-lightning ' if command != 'lssf-lightning' else ''}{command}: {what}; no partial output was "
        "left behind",
        file=sys.stderr,
    )
    return 143 if isinstance(err, _Terminated) else 130


def _guarded(run: Callable[[], object], command: str) -> int:
    """Run ``run``; any error becomes one line on stderr and exit code 1 (``LSSF_LIGHTNING_DEBUG=1``:
    traceback)."""
    import signal
    import warnings

    debug = bool(os.environ.get("LSSF_LIGHTNING_DEBUG"))
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warning
            run()
    except KeyboardInterrupt as err:
        return _interrupted(command, err)
    except Exception as err:
        if _received:  # a library turned the signal into its own error
            stopped = _Terminated() if _received[-1] == signal.SIGTERM else KeyboardInterrupt()
            return _interrupted(command, stopped)
        if debug:
            raise
        print(f"lssf-lightning {command}: error: {_describe(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
