"""Fork server: import the stages' libraries once, then run every stage process as a fork of that importer.

A study starts about a hundred stage processes (`python stages/<x>.py`) and most of them spend more time importing
torch, transformers, peft, ragas and sentence-transformers (2-9 s each, `bench/results/imports.json`) than working.
Under `python -m telekd.forkserver <command>` a server process imports PRELOAD once; a stage script whose
`__main__` calls `run_stage(main)` then sends its argv, working directory, environment and standard streams (the
descriptors themselves, SCM_RIGHTS) over a Unix socket to the server, which forks; the fork runs the script as
`python <script>` would (runpy, `__name__ == "__main__"`) and its exit status becomes the stage process's. Without
TELEKD_FORKSERVER in the environment `run_stage(main)` is `main()`: the scripts stay standalone.

    python -m telekd.forkserver dvc repro
    python -m telekd.forkserver python -m telekd.lockfile repro    # what `make repro` runs (telekd.lockfile: DVC
                                                                   # with dvc.lock kept parsed between stages)

A fork is the same computation as a fresh process (`tests/test_forkserver.py`; `bench/study.py` compares every
per-sample score of a whole study), because:
- the server imports third-party libraries only (no telekd module but this one, so each stage reads the source on
  disk) and computes nothing (a fork of a process whose OpenMP pool had started inherits a dead pool);
- the environment must be the server's (libraries read some of it at import, e.g. HF_HUB_OFFLINE), up to the
  variables DVC and the shell set per command (SAME_ENV_EXCEPT): a differing variable is an error that names it;
- `random` and numpy's global generator are reseeded from the OS as a fresh process seeds them;
- string hashing is unrandomized (the server starts with PYTHONHASHSEED=0, every fork keeps it): the eval stages
  re-run themselves with that seed anyway (bert-score batches a set of texts: `evaluation.fixed_hash_seed`), and no
  other output depends on the seed (README: Determinism).
A stage under a launcher (torchrun, accelerate launch, mpirun: WORLD_SIZE or LOCAL_RANK set) is refused: its
processes need their own interpreters. Signals sent to the client are forwarded (SIGINT to the fork's process
group, as a terminal sends it); when the client dies, or the server does, the fork dies too (its process group,
PR_SET_PDEATHSIG). A server asked to stop (SIGTERM: a scheduler stopping the whole job) lets running forks finish.

Where a fork is not a fresh `python <script>` (a stage must not rely on these): it runs with the server's
interpreter flags (`python -O/-W/-X` on a stage command are refused by name), its cgroup and resource limits
but the client's CPU affinity and niceness; a stage's module-level code runs twice (client and fork: keep it to
imports); SIGTSTP/SIGCONT (Ctrl-Z) are not forwarded; `dvc queue start` is not served (its workers outlive the
command that started the server).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile

ENV = "TELEKD_FORKSERVER"     # the server's socket path, set by `python -m telekd.forkserver` for its command
# What the stages import (measured with `python -X importtime stages/<x>.py`): the packages and the lazily loaded
# submodules that cost time. A module missing here only costs its import in each fork.
PRELOAD = (
    "numpy", "torch", "transformers", "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral", "transformers.generation.utils", "safetensors.torch",
    "accelerate", "peft", "trl", "datasets", "dvclive", "sentence_transformers", "bert_score", "ragas",
    "ragas.metrics", "xgrammar", "nltk", "rouge_score.rouge_scorer", "scipy.stats", "statsmodels.stats.multitest",
)
# Set per command by DVC (DVC_ROOT, DVC_STAGE, DVC_EXP_*) or by the shell it runs the command in; PATH only
# locates executables (pyenv's shims are rewritten by DVC's fix_env); PYTHONHASHSEED acts at start-up only, and
# the server starts with 0, which every fork keeps (see the module's docstring).
SAME_ENV_EXCEPT = ("PWD", "OLDPWD", "SHLVL", "_", "PATH", "PYTHONHASHSEED")
# The process counts a multi-process launcher sets (telekd.shard.WORLD_SIZE_ENV; not imported from there, which
# would make every stage depend on shard.py)
_LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# sys.flags a fork inherits from the server (hash_randomization aside: the server's 0 is deliberate, see above)
_FLAGS = ("debug", "inspect", "interactive", "optimize", "dont_write_bytecode", "no_user_site", "no_site",
          "ignore_environment", "verbose", "bytes_warning", "quiet", "isolated", "dev_mode", "utf8_mode", "safe_path",
          "warn_default_encoding")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_MAX_REQUEST = 1 << 20
_in_fork = False              # True in a fork the server made for a stage


def run_stage(main) -> None:
    """Run a stage script's main(): in the fork server named by $TELEKD_FORKSERVER if set, else in this process.

    Exits with the fork's exit status (SystemExit) when it delegates. Raises SystemExit with a one-line reason when
    the server is unreachable, refuses the request, or the stage runs under a distributed launcher.
    """
    path = os.environ.get(ENV)
    if not path or _in_fork:
        main()
        return
    launcher = [k for k in _LAUNCHER_ENV if k in os.environ]
    if launcher:
        raise SystemExit(f"{ENV} is set under a distributed launcher ({launcher[0]}={os.environ[launcher[0]]}): "
                         f"unset {ENV} for launcher runs")
    sys.exit(_delegate(path))


def _delegate(path: str) -> int:
    """Hand this process's argv, cwd, environment and fds 0-2 to the server at path; return the fork's exit code.

    Until the fork exits, the signals a user or scheduler sends to this process (FORWARDED) go to the fork, so a
    training stage still checkpoints on SIGTERM and a Ctrl-C still interrupts it.
    """
    fds = [fd if _is_open(fd) else os.open(os.devnull, os.O_RDWR) for fd in (0, 1, 2)]
    request = json.dumps({"argv": sys.argv, "orig_argv": sys.orig_argv, "cwd": os.getcwd(), "env": dict(os.environ),
                          "interpreter": _interpreter(), "affinity": sorted(os.sched_getaffinity(0)),
                          "nice": os.nice(0)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(path)
        except OSError as e:
            raise SystemExit(f"{ENV}={path}: no fork server there ({e.strerror}); unset {ENV} or run the command "
                             "under `python -m telekd.forkserver`") from None
        socket.send_fds(s, [request], fds)
        while True:
            reply = s.recv(_MAX_REQUEST)
            if not reply:
                raise SystemExit(f"the fork server at {path} closed the connection without an exit status (did it "
                                 "die? its error is above)")
            r = json.loads(reply)
            if "pid" in r:
                for sig in FORWARDED:
                    signal.signal(sig, lambda signum, _, pid=r["pid"]: _forward(pid, signum))
            elif "error" in r:
                print(f"fork server: {r['error']}", file=sys.stderr)
                return 2
            else:
                return r["exit"]


def _forward(pid: int, signum: int) -> None:
    """A signal this client got, to its fork: SIGINT to the fork's process group (a terminal's Ctrl-C reaches every
    process of the foreground group, spawn workers included), any other to the fork alone, as `kill <pid>` would."""
    try:
        os.killpg(pid, signum) if signum == signal.SIGINT else os.kill(pid, signum)
    except ProcessLookupError:   # it has just exited; its status is on its way
        pass


def _interpreter() -> dict:
    """What a fork cannot change after start-up: the interpreter and its flags (-O, -W, -X, -B, ...)."""
    flags = {k: getattr(sys.flags, k) for k in _FLAGS if hasattr(sys.flags, k)}
    return {"executable": os.path.realpath(sys.executable), "flags": flags, "warnoptions": sys.warnoptions,
            "xoptions": {k: str(v) for k, v in sys._xoptions.items()}}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def env_difference(server: dict, client: dict) -> list[str]:
    """Names of the variables that differ between two environments, but for DVC_* and SAME_ENV_EXCEPT; sorted."""
    names = set(server) | set(client)
    return sorted(n for n in names if server.get(n) != client.get(n)
                  and not n.startswith("DVC_") and n not in SAME_ENV_EXCEPT)


class _Fork(Exception):
    """Raised in the forked child to leave the server loop: the child runs the stage instead."""

    def __init__(self, request: dict, fds: list[int]):
        super().__init__("fork")
        self.request, self.fds = request, fds


def serve(listener: socket.socket, preload=PRELOAD) -> None:
    """Serve stage requests on `listener` until SIGTERM, each in a fork, importing `preload` while none waits.

    A request that arrives before every module is imported is served by a fork of what is imported so far (the
    fork imports the rest itself, as a fresh process would), so the first, light stages need not wait for torch.
    In the fork this raises `_Fork` (the caller runs `run_fork`); the server itself returns after SIGTERM (the
    command has ended, or a scheduler stops the whole job), once the stages still running have ended: it accepts
    nothing more meanwhile, and each of them got the signal through its client and may be saving a checkpoint.
    """
    env = dict(os.environ)                     # what the clients must match (before the imports add to it)
    pending = list(preload)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, ("listener", 0))
    clients: dict[int, socket.socket] = {}    # pid of a running fork -> its client's connection
    # A signal's number is written to `woken` as it arrives, so the select below wakes for SIGTERM
    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)
    sel.register(woken, selectors.EVENT_READ, ("signal", 0))
    signal.signal(signal.SIGTERM, lambda *_: None)   # a Python handler, so that the wakeup fd is written
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C reaches each stage through its client, not from here
    stopping = False
    try:
        while not stopping or clients:
            events = sel.select(timeout=0 if pending and not stopping else None)
            if not events and pending and not stopping:
                _preload(pending.pop(0))
            for key, _ in events:
                what, pid = key.data
                if what == "listener":
                    _serve_one(listener, sel, clients, env)
                elif what == "signal":
                    if signal.SIGTERM in os.read(woken, 64) and not stopping:
                        stopping = True
                        sel.unregister(listener)
                elif what == "client" and pid not in clients:   # reaped in this same round: nothing to stop
                    continue
                elif what == "exited":
                    sel.unregister(key.fileobj)
                    os.close(key.fileobj)
                    _, status = os.waitpid(pid, 0)
                    _reply(clients.pop(pid), sel, {"exit": _shell_code(os.waitstatus_to_exitcode(status))})
                else:                              # EOF from the client: it died, so the stage must too
                    sel.unregister(key.fileobj)
                    _kill_group(pid)
    finally:
        for pid in clients:
            _kill_group(pid)


def _preload(name: str) -> None:
    """Import one module of the preload list; one that fails is reported and left to the forks that need it (each
    then fails as a fresh process would), not fatal to the others."""
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 (any import error: reported, and the stages that import it will raise it)
        print(f"telekd.forkserver: preloading {name} failed ({type(e).__name__}: {e}); stages import it themselves",
              file=sys.stderr)


def _serve_one(listener, sel, clients: dict, env: dict) -> None:
    """Accept one request and fork for it; in the child raise `_Fork` with the request, its environment completed."""
    request, fds, conn = _receive(listener, env)
    if request is None:
        return
    # The imported objects move to a generation the collector never scans: the fork's collections would otherwise
    # touch (and so copy) every page of them (gc.freeze, meant for exactly this)
    gc.freeze()
    pid = os.fork()
    if pid == 0:                               # the child: leave the server without touching the other stages
        # what the imports set (torch: KMP_DUPLICATE_LIB_OK, ...), as a fresh process importing them would get it
        added = {k: v for k, v in os.environ.items() if env.get(k) != v}
        request["env"] = {**added, **request["env"]}
        clients.clear()
        os.close(signal.set_wakeup_fd(-1))
        for k in list(sel.get_map().values()):   # the listener, other stages' connections, pidfds, the wakeup pipe
            if isinstance(k.fileobj, int):
                os.close(k.fileobj)
            else:
                k.fileobj.close()
        sel.close()
        conn.close()
        raise _Fork(request, fds)
    for fd in fds:
        os.close(fd)
    _send(conn, {"pid": pid})                 # the client forwards its signals to it
    clients[pid] = conn
    sel.register(os.pidfd_open(pid), selectors.EVENT_READ, ("exited", pid))
    sel.register(conn, selectors.EVENT_READ, ("client", pid))


def _kill_group(pid: int) -> None:
    """SIGKILL a fork and whatever it started (its process group, see run_fork's setsid)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:   # it has exited already; its exit is reaped and reported as usual
        pass


def _receive(listener, env: dict):
    """Accept one connection: (request, its three fds, connection), or Nones after refusing it."""
    conn, _ = listener.accept()
    msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
    try:
        request = json.loads(msg)
        differ = env_difference(env, request["env"])
        differ += [f"interpreter {k}" for k, v in _interpreter().items() if request["interpreter"][k] != v]
    except (ValueError, KeyError, TypeError):   # a client that died before sending, or not run_stage's
        request, differ = None, []
    if request is not None and len(fds) == 3 and not differ:
        return request, fds, conn
    for fd in fds:
        os.close(fd)
    why = (f"{', '.join(differ)} differ(s) from the server's (libraries read the environment at import; flags act at "
           "start-up): run the command under a server started with them" if differ else
           "expected run_stage's request: argv, cwd, env and fds 0, 1 and 2")
    _reply(conn, None, {"error": why})
    return None, None, None


def _reply(conn: socket.socket, sel, reply: dict) -> None:
    """Send the last message of a request and close its connection."""
    if sel is not None and conn in (k.fileobj for k in sel.get_map().values()):
        sel.unregister(conn)
    _send(conn, reply)
    conn.close()


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.send(json.dumps(message).encode())
    except OSError:        # the client is gone (which is why its stage was killed)
        pass


def _shell_code(code: int) -> int:
    """An exit code as subprocess/os.waitstatus_to_exitcode give it (-n: killed by signal n) as a shell reports it."""
    return code if code >= 0 else 128 - code


def run_fork(request: dict, fds: list[int]) -> int:
    """In the forked child: become the stage process `request` describes and run its script; its exit code."""
    import random
    import runpy

    global _in_fork
    _in_fork = True
    os.setsid()                              # its own process group: the server kills the group if the client dies
    import ctypes

    server = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG: die with the server
    if os.getppid() != server:
        os._exit(128 + signal.SIGKILL)
    os.sched_setaffinity(0, request["affinity"])
    os.nice(request["nice"] - os.nice(0))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)          # as in a fresh interpreter
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=unbuffered or os.isatty(1))
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    script = request["argv"][0]
    sys.argv, sys.orig_argv = list(request["argv"]), list(request["orig_argv"])
    sys.path[0] = os.path.dirname(os.path.realpath(script))      # as python sets it: the script's real folder
    try:
        runpy.run_path(script, run_name="__main__")   # argv[0] as given (so __file__ too: python makes it absolute)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


def run_with_server(cmd: list[str], preload=PRELOAD) -> int:
    """Run cmd with a fork server for its stages (TELEKD_FORKSERVER in its environment); cmd's exit code.

    The socket listens before the server has imported anything: the first stages queue while it imports `preload`.
    """
    with tempfile.TemporaryDirectory(prefix="telekd-forkserver-") as d:
        path = os.path.join(d, "socket")
        env = {**os.environ, ENV: path}
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
            listener.bind(path)
            listener.listen(64)
            server = subprocess.Popen([sys.executable, "-m", "telekd.forkserver", "--serve", str(listener.fileno()),
                                       "--preload", ",".join(preload)], pass_fds=[listener.fileno()],
                                      env={**env, "PYTHONHASHSEED": "0"})
        # A Ctrl-C is the command's to handle (DVC stops its stage, whose client forwards it to the fork): this
        # process waits for the command (a handler, not SIG_IGN, which the command would inherit); SIGTERM and
        # SIGHUP go on to the command; the server stops after it, once its running forks have ended
        try:
            proc = subprocess.Popen(cmd, env=env)
        except OSError as e:
            server.terminate()
            server.wait()
            raise SystemExit(f"python -m telekd.forkserver: cannot run {cmd[0]!r}: {e.strerror}") from None
        previous = {sig: signal.signal(sig, handler) for sig, handler in (
            (signal.SIGINT, lambda *_: None), (signal.SIGTERM, lambda signum, _: proc.send_signal(signum)),
            (signal.SIGHUP, lambda signum, _: proc.send_signal(signum)))}
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.terminate()
            server.wait()
        return _shell_code(code)


def main(argv: list[str]) -> int:
    """`python -m telekd.forkserver <command...>`: run the command with a fork server for its stages."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m telekd.forkserver", description=__doc__.split("\n\n")[0],
                                 epilog="e.g. python -m telekd.forkserver python -m telekd.lockfile repro")
    ap.add_argument("--preload", default=",".join(PRELOAD), help="modules the server imports (comma-separated)")
    ap.add_argument("--serve", type=int, metavar="FD", help=argparse.SUPPRESS)   # the server, run_with_server's child
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments, e.g. dvc repro")
    a = ap.parse_args(argv)
    preload = [m for m in a.preload.split(",") if m]
    if a.serve is not None:
        try:
            serve(socket.socket(fileno=a.serve), preload)
        except _Fork as f:       # run the stage outside the handler: no exception context leaks into it
            fork = f
        else:
            return 0
        return run_fork(fork.request, fork.fds)
    if a.command[:1] == ["--"]:
        a.command = a.command[1:]
    if not a.command:
        ap.error("give the command to run, e.g. dvc repro")
    return run_with_server(a.command, preload)


if __name__ == "__main__":      # run as telekd.forkserver, not __main__: the forks must see that module's _in_fork
    from telekd.forkserver import main as _main

    sys.exit(_main(sys.argv[1:]))
