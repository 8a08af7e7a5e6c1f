"""The `deadrelu` command: a thin Typer app. Heavy modules (torch, onnx) are imported inside commands."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback

import typer

from deadrelu_cli.cli.console import make_console, survive_narrow_encodings
from deadrelu_cli.display import terminal_text
from deadrelu_cli.errors import EXIT_INTERNAL, DeadreluError, one_line
from deadrelu_cli.version import __version__

app = typer.Typer(
    name="deadrelu",
    help="Find dead ReLU units in saved checkpoints (PyTorch, safetensors, TorchScript, torch.export, ONNX).",
    no_args_is_help=True,
    epilog="Exit codes: 0 ok, 1 gate failed, 2 usage or input error, 3 internal error. Add --debug for tracebacks.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"deadrelu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Exit codes: 0 ok, 1 gate failed, 2 usage or input error, 3 internal error. Add --debug for tracebacks."""


def _register() -> None:
    from deadrelu_cli.cli import fix_cmd, inspect_cmd, report_cmds, scan_cmd, trend_cmd

    scan_cmd.register(app)
    fix_cmd.register(app)
    inspect_cmd.register(app)
    report_cmds.register(app)
    trend_cmd.register(app)


_register()


def _join_input_range(args: list[str]) -> list[str]:
    """`--input-range -1 1` (two numbers, the first may look like a flag) -> `--input-range=-1 1`."""
    out, i = [], 0
    while i < len(args):
        if (
            args[i] == "--input-range"
            and i + 2 < len(args) + 0
            and _is_number(args[i + 1])
            and _is_number(args[i + 2])
        ):
            out.append(f"--input-range={args[i + 1]} {args[i + 2]}")
            i += 3
            continue
        out.append(args[i])
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# Typer vendors Click; its public BadParameter is a Click UsageError, a ClickException (usage errors and
# the like, exit 2), which we catch to print in one line instead of Typer's boxed panel.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def usage_message(exc: Exception) -> str:
    """A Click usage error as one line, with the command whose --help tells more."""
    text = one_line(exc.format_message())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        text += f" (see '{ctx.command_path} --help')"
    return text


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every `finally` (temp files) runs as for Ctrl-C
    (not a KeyboardInterrupt: Typer turns those into exit 130)."""


SIGNALLED: list[int] = []  # the signals this run received (SIGINT, SIGTERM), as their handlers saw them


def _terminate_like_interrupt() -> None:
    import signal
    import threading

    def handler(signum, frame):
        SIGNALLED.append(signum)
        raise Terminated()

    def interrupt(signum, frame):
        SIGNALLED.append(signum)
        signal.default_int_handler(signum, frame)

    if threading.current_thread() is threading.main_thread():  # signals can only be set there
        signal.signal(signal.SIGTERM, handler)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
            signal.signal(signal.SIGINT, interrupt)


def main(argv: list[str] | None = None) -> None:
    try:
        run_command(argv)
    except SystemExit as exc:
        distributed = sys.modules.get("deadrelu_cli.distributed")
        if argv is None and distributed is not None and distributed.WORLD_CLOSED:
            # a torchrun worker whose results are written and flushed: leave now (see WORLD_CLOSED)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


def run_command(argv: list[str] | None = None) -> None:
    args = _join_input_range(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args or os.environ.get("DEADRELU_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    survive_narrow_encodings()
    err = make_console(stderr=True, soft_wrap=True)
    set_debug = debug and os.environ.get("DEADRELU_DEBUG") != "1"
    if set_debug:  # for the backends (onnxruntime's own log lines), for this run only
        os.environ["DEADRELU_DEBUG"] = "1"
    if not debug:  # library deprecation chatter (torch.jit, pytree, …) is not the user's business
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        # a CI job whose $HOME is read-only (a container's non-root user): matplotlib says on stderr
        # that it made a temporary cache folder instead; nothing the user has to act on
        logging.getLogger("matplotlib").setLevel(logging.ERROR)
    # onnxruntime >= 1.29 sends telemetry on import, and says in a coloured warning when it cannot keep a
    # device id in a read-only $HOME; a scan never uses the network (set ORT_DISABLE_TELEMETRY=0 to allow)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    SIGNALLED.clear()
    _terminate_like_interrupt()
    try:
        # not standalone: usage errors come here, to be told in one line like every other error
        code = app(args=args, prog_name="deadrelu", standalone_mode=False)
        if code == 130:  # Typer turns Ctrl-C inside a command into Exit(130) before it reaches us
            err.print("deadrelu: interrupted", markup=False)
        sys.exit(code if isinstance(code, int) else 0)
    except CLICK_ERROR as exc:
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            if debug:
                traceback.print_exc()
            err.print(f"deadrelu: error: {usage_message(exc)}", markup=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("deadrelu: interrupted", markup=False)
        sys.exit(130)
    except DeadreluError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"deadrelu: error: {one_line(terminal_text(str(exc)))}", markup=False)
        sys.exit(exc.exit_code)
    except Terminated:
        err.print("deadrelu: terminated", markup=False)
        sys.exit(143)
    except KeyboardInterrupt:
        err.print("deadrelu: interrupted", markup=False)
        sys.exit(130)
    except BrokenPipeError:
        # the reader went away before the output was complete (`| head`): never exit 0 then, a gate
        # may not have run; exit 1 as Rich's own handler and Python's docs do, with no second error
        # when the interpreter flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if (
            SIGNALLED
        ):  # Ctrl-C / SIGTERM inside native code (the TorchScript interpreter) surfaces as its error
            import signal

            interrupted = SIGNALLED[-1] == signal.SIGINT
            err.print(f"deadrelu: {'interrupted' if interrupted else 'terminated'}", markup=False)
            sys.exit(130 if interrupted else 143)
        try:
            with tempfile.NamedTemporaryFile(
                "w", prefix="deadrelu-crash-", suffix=".log", delete=False
            ) as log:
                traceback.print_exc(file=log)
            where = f"traceback in {log.name}; please report it with that file"
        except OSError:  # no writable temp folder (a read-only container): still one line, still exit 3
            where = "no writable temp folder for the traceback: rerun with --debug to see it"
        err.print(
            f"deadrelu: internal error: {type(exc).__name__}: {one_line(terminal_text(str(exc)), 200)} ({where})",
            markup=False,
        )
        sys.exit(EXIT_INTERNAL)
    finally:
        if set_debug:
            del os.environ["DEADRELU_DEBUG"]
