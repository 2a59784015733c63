"""The driver's stop signals: SIGINT (Ctrl-C) and SIGTERM (`scancel`, Kubernetes, `kill`), to its PID or to
its whole process group, at any moment of a search.

The first signal is remembered (`stop_signal`), so that nothing is selected, started or reported after it,
and it ends the search the one way that keeps its state: inside a Tune run, the run stops at its next step
(`tune_upl.search` asks Tune to, as SIGUSR1 would; Tune's own SIGINT handler is off), saves the experiment
and returns, and the search raises then; elsewhere `Interrupted` or `Terminated` is raised at once. A
second signal always raises.

A watchdog bounds the stop: SIGTERM to the process group also reaches Ray's own processes (the driver's
children), and a driver whose Ray is gone would wait a minute for it, then exit 1 without a word. Once Ray
is gone (its GCS refuses connections on two probes a second apart), or `DEADLINE_S` after the first signal,
the watchdog says why and the resume command, and exits 130 or 143: the state Tune saved last resumes
(Tune saves it as the run goes). The watchdog starts from the signal itself, not from the Python handler:
Python runs a handler only when the main thread next executes bytecode, and a main thread blocked in Ray's
C code waiting for a GCS that is gone would not run it for a minute. The C-level handler writes every
signal's number to `signal.set_wakeup_fd`'s socket at once, and a listening thread arms the watchdog.

Standard library only: the search's modules ask it whether to go on; Ray's part is `tune_upl.search`'s.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tune_upl.errors import Terminated

EXIT_INTERRUPTED = 130  # SIGINT: 128 + 2, as a shell reports it
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15
DEADLINE_S = 20.0  # first signal to exit at most (Slurm's KillWait is 30 s by default)
PROBE_EVERY_S = 1.0  # how often the watchdog asks whether Ray is still there


class Interrupted(KeyboardInterrupt):
    """The search stopped on SIGINT (or before every trial ended): its state is saved, resume it."""


@dataclass
class _Stop:
    """What the handlers share: the first signal, the handlers they replaced, and the stop's helpers."""

    signum: Optional[int] = None
    count: int = 0
    depth: int = 0  # nested `install`s: the handlers go back at the outermost `uninstall`
    replaced: dict[int, Any] = field(default_factory=dict)
    in_run: bool = False  # a Tune run is in progress: it stops at its next step (`tune_upl.search`)
    resume: str = ""  # the command that continues the search
    watchdog: bool = False  # the command line's driver: end the process DEADLINE_S after the first signal
    ray_gone: Callable[[], Optional[str]] = lambda: None  # why Ray is unreachable, or None
    said: bool = False  # the resume command was printed: the watchdog only ends the process
    timer: Optional[threading.Thread] = None
    wakeup: Optional[tuple[socket.socket, socket.socket]] = None  # (read, write) of the wakeup socket
    wakeup_before: int = -1  # the wakeup fd it replaced


_stop = _Stop()
_arming = threading.Lock()


def stop_signal() -> Optional[int]:
    """The first stop signal this driver received (signal.SIGINT or SIGTERM), or None."""
    return _stop.signum


def stopping() -> bool:
    return _stop.signum is not None


def stop_error(detail: str) -> KeyboardInterrupt:
    """The exception that ends a stopped search: Terminated after SIGTERM, else Interrupted."""
    return Terminated(detail) if _stop.signum == signal.SIGTERM else Interrupted(detail)


def exit_code(error: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _on_signal(signum: int, frame: Any) -> None:
    _stop.count += 1
    if _stop.signum is None:
        _stop.signum = signum
        _arm(signum)
        if _stop.in_run:  # Tune stops at its next step and saves the experiment
            return
    raise stop_error(_name(signum) if _stop.count == 1 else f"{_name(signum)} again")


def _arm(signum: int) -> None:
    """Start the watchdog once, from the first stop signal (the handler or the wakeup listener, whichever
    sees it first)."""
    with _arming:
        if _stop.watchdog and _stop.timer is None:
            _stop.timer = threading.Thread(target=_watch, args=(signum,), name="stop-watchdog", daemon=True)
            _stop.timer.start()


def _listen(reader: socket.socket) -> None:
    """The wakeup socket's reader: arms the watchdog at a SIGINT or SIGTERM even while the main thread is
    blocked; ends when the socket is closed (`uninstall`)."""
    while True:
        try:
            got = reader.recv(16)
        except OSError:
            return
        if not got:
            return
        stops = [n for n in got if n in (signal.SIGINT, signal.SIGTERM)]
        if stops:
            _arm(stops[0])


def _listen_for_signals() -> None:
    """The wakeup socket and its reader, for an armed watchdog."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    _stop.wakeup_before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _stop.wakeup = (reader, writer)
    threading.Thread(target=_listen, args=(reader,), name="stop-listener", daemon=True).start()


def _stop_listening() -> None:
    if _stop.wakeup is None:
        return
    signal.set_wakeup_fd(_stop.wakeup_before)
    reader, writer = _stop.wakeup
    reader.shutdown(socket.SHUT_RDWR)  # wakes the listener
    reader.close()
    writer.close()
    _stop.wakeup = None


def _watch(signum: int) -> None:
    """The watchdog: ends the process once Ray is found gone twice in a row (a second apart: nothing Tune
    could still save needs it), or `DEADLINE_S` after the first signal, saying why and how to resume."""
    start, gone_before = time.monotonic(), False
    while True:
        time.sleep(PROBE_EVERY_S)
        try:
            gone = _stop.ray_gone()
        except Exception as error:  # the probe itself must not keep the process alive
            gone = f"Ray could not be asked ({error})"
        if (gone and gone_before) or time.monotonic() - start >= DEADLINE_S:
            break
        gone_before = bool(gone)
    code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    word = "terminated" if code == EXIT_TERMINATED else "interrupted"
    why = gone or f"Tune did not stop within {DEADLINE_S:.0f} s"
    if _stop.said:  # the driver is on its way out: only Ray's shutdown is left, and Ray's processes end with it
        message = "" if gone else f"Ray did not shut down within {DEADLINE_S:.0f} s of the signal; exiting\n"
    else:
        message = (f"{word} ({_name(signum)}): {why}; the experiment state Tune saved last resumes; "
                   f"continue with: {_stop.resume}\n")
    try:
        sys.stdout.flush()
        os.write(2, message.encode())
    finally:
        os._exit(code)


def install(resume: str = "", watchdog: bool = False) -> None:
    """Handle SIGINT and SIGTERM in the driver's main thread; `resume` is the command the watchdog prints,
    `watchdog` arms it (the command line's driver only: a program that embeds the search keeps its process).
    Nests: the handlers go back at the outermost `uninstall`. Nothing outside the main thread, where Python
    allows no handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    _stop.depth += 1
    _stop.resume = resume or _stop.resume
    _stop.watchdog = watchdog or _stop.watchdog
    if watchdog and _stop.wakeup is None:
        _listen_for_signals()
    reinstall()


def reinstall() -> None:
    """The handlers again, where installed: `ray.init`'s core worker puts a SIGTERM handler of its own in
    place that dumps a stack and aborts (exit 134)."""
    if _stop.depth == 0 or threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.signal(signum, _on_signal)
        if previous is not _on_signal:
            _stop.replaced.setdefault(signum, previous)


def uninstall() -> None:
    """At the outermost level, put back the handlers `install` replaced and forget the signal. A watchdog
    already running keeps running: the driver is on its way out, and Ray's shutdown must not hold it."""
    global _stop
    if _stop.depth == 0 or threading.current_thread() is not threading.main_thread():
        return
    _stop.depth -= 1
    if _stop.depth:
        return
    for signum, previous in _stop.replaced.items():
        signal.signal(signum, previous)
    _stop_listening()
    running = _stop.timer is not None and _stop.timer.is_alive()
    _stop = (_Stop(timer=_stop.timer, said=_stop.said, ray_gone=_stop.ray_gone, resume=_stop.resume) if running
             else _Stop())


def set_run(active: bool) -> None:
    """While a Tune run is in progress the first signal is only recorded: the run asks `stopping()` at each
    step, stops, saves the experiment and returns, and the search raises `stop_error` then."""
    _stop.in_run = active


def set_ray_probe(probe: Callable[[], Optional[str]]) -> None:
    _stop.ray_gone = probe


def said() -> None:
    """The resume command has been printed: the watchdog, if it fires, only ends the process."""
    _stop.said = True
