"""telekd.forkserver: a stage run as a fork of the server behaves as `python <script>` does.

The servers here preload `json` only (a second each); the whole study under the real PRELOAD is compared with a
plain run in tests/reliability/test_determinism.py (its two reduced studies: one forked, one not).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from telekd import forkserver

SCRIPT = textwrap.dedent('''
    """A stand-in stage: reports what it sees, then does what its first argument says."""
    import json, os, random, sys
    from telekd.forkserver import run_stage


    def main():
        what = sys.argv[1]
        if what == "report":
            print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                              "stdin": sys.stdin.read(), "var": os.environ.get("STAGE_VAR"),
                              "random": random.random(), "pid": os.getpid(), "hash": hash("a batch of answers")}))
        elif what == "exit":
            sys.exit(int(sys.argv[2]))
        elif what == "message":
            sys.exit("stage failed: bad input")
        elif what == "raise":
            raise ValueError("boom")
        elif what == "sleep":
            open(sys.argv[2], "w").write(str(os.getpid()))
            import time
            time.sleep(60)
        print("stderr line", file=sys.stderr)


    if __name__ == "__main__":
        run_stage(main)
''')


@pytest.fixture
def stage(tmp_path):
    d = tmp_path / "stages"
    d.mkdir()
    (d / "fake.py").write_text(SCRIPT)
    return tmp_path


def run_all(stage, calls: list[str], env=None) -> list[dict]:
    """Run each shell line in `calls` under one fork server (preload json) and directly; their results."""
    script = stage / "calls.sh"
    out = stage / "out"
    out.mkdir(exist_ok=True)
    lines = [f"( {c} ) > {out}/{i}.out 2> {out}/{i}.err; echo $? > {out}/{i}.rc" for i, c in enumerate(calls)]
    script.write_text("\n".join(lines) + "\n")
    env = {**os.environ, **(env or {})}
    subprocess.run([sys.executable, "-m", "telekd.forkserver", "--preload", "json", "bash", str(script)],
                   cwd=stage, env=env, check=True, timeout=120)
    return [{"out": (out / f"{i}.out").read_text(), "err": (out / f"{i}.err").read_text(),
             "rc": int((out / f"{i}.rc").read_text())} for i in range(len(calls))]


def direct(stage, call: str) -> dict:
    p = subprocess.run(call, shell=True, cwd=stage, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != forkserver.ENV})
    return {"out": p.stdout, "err": p.stderr, "rc": p.returncode}


def test_a_fork_sees_what_a_fresh_process_sees(stage):
    call = f"echo piped | STAGE_VAR=x {sys.executable} stages/fake.py report"
    forked, forked2 = run_all(stage, [call, call], env={"STAGE_VAR": "x"})
    plain = direct(stage, call)
    assert forked["rc"] == plain["rc"] == 0
    f, f2, p = (json.loads(r["out"]) for r in (forked, forked2, plain))
    assert f["pid"] != f2["pid"]
    for key in ("argv", "cwd", "path0", "name", "stdin", "var"):
        assert f[key] == p[key], key
    assert f == {**p, "random": f["random"], "pid": f["pid"], "hash": f["hash"]}
    assert f["path0"] == str(stage / "stages") and f["name"] == "__main__" and f["stdin"] == "piped\n"
    assert f["random"] != f2["random"]          # reseeded per fork, as a fresh process is
    # string hashing unrandomized in every fork (bert-score's batches follow it: evaluation.fixed_hash_seed)
    seed0 = subprocess.run([sys.executable, "-c", "print(hash('a batch of answers'))"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True).stdout
    assert f["hash"] == f2["hash"] == int(seed0)
    assert forked["err"] == plain["err"] == "stderr line\n"


@pytest.mark.parametrize("args, rc, err", [
    ("exit 0", 0, ""),
    ("exit 3", 3, ""),
    ("message", 1, "stage failed: bad input\n"),
])
def test_exit_status_and_messages_are_the_script_s(stage, args, rc, err):
    call = f"{sys.executable} stages/fake.py {args}"
    (forked,) = run_all(stage, [call])
    assert forked == direct(stage, call) == {"out": "", "err": err, "rc": rc}


def test_an_uncaught_exception_exits_1_with_its_traceback(stage):
    call = f"{sys.executable} stages/fake.py raise"
    (forked,) = run_all(stage, [call])
    plain = direct(stage, call)
    assert forked["rc"] == plain["rc"] == 1
    assert forked["err"].splitlines()[-1] == plain["err"].splitlines()[-1] == "ValueError: boom"


def test_a_different_environment_is_refused_by_name(stage):
    (forked,) = run_all(stage, [f"EXTRA_SETTING=1 {sys.executable} stages/fake.py exit 0"])
    assert forked["rc"] == 2
    assert "EXTRA_SETTING" in forked["err"] and "from the server's" in forked["err"]


def test_interpreter_flags_are_refused_by_name(stage):
    """`python -O` cannot act in a fork of a server started without it: refused, not silently dropped."""
    (forked,) = run_all(stage, [f"{sys.executable} -O stages/fake.py exit 0"])
    assert forked["rc"] == 2 and "interpreter flags" in forked["err"]


def test_dvc_s_own_variables_are_allowed(stage):
    (forked,) = run_all(stage, [f"DVC_STAGE=x DVC_ROOT=/r {sys.executable} stages/fake.py exit 0"])
    assert forked["rc"] == 0, forked["err"]


def test_a_killed_client_takes_its_fork_with_it(stage):
    pid_file = stage / "fork.pid"
    call = (f"{sys.executable} stages/fake.py sleep {pid_file} & c=$!; "
            f"for i in $(seq 100); do test -s {pid_file} && break; sleep 0.1; done; kill -9 $c; wait $c")
    (forked,) = run_all(stage, [call])
    assert forked["rc"] == 128 + signal.SIGKILL
    pid = int(pid_file.read_text())
    for _ in range(50):
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the fork {pid} outlived its client")


def test_no_server_and_distributed_launchers_are_refused(stage, monkeypatch):
    monkeypatch.setenv(forkserver.ENV, str(stage / "no-socket"))
    with pytest.raises(SystemExit, match="no fork server there"):
        forkserver.run_stage(lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "0")          # torchrun with one process sets WORLD_SIZE=1 and LOCAL_RANK
    with pytest.raises(SystemExit, match="distributed launcher"):
        forkserver.run_stage(lambda: None)


def test_without_the_variable_main_runs_here(monkeypatch):
    monkeypatch.delenv(forkserver.ENV, raising=False)
    ran = []
    forkserver.run_stage(lambda: ran.append(os.getpid()))
    assert ran == [os.getpid()]


def test_env_difference():
    server = {"A": "1", "PATH": "/a", "HF_HUB_OFFLINE": "1"}
    client = {"A": "1", "PATH": "/b", "DVC_STAGE": "kd", "PWD": "/x", "B": "2"}
    assert forkserver.env_difference(server, client) == ["B", "HF_HUB_OFFLINE"]


def test_every_stage_script_goes_through_run_stage():
    from pathlib import Path

    stages = sorted((Path(__file__).resolve().parents[1] / "stages").glob("*.py"))
    assert stages
    for s in stages:
        assert s.read_text().endswith('if __name__ == "__main__":\n    run_stage(main)\n'), s.name


def test_a_signal_to_the_client_reaches_the_fork(stage):
    """SIGTERM to the stage's process (a scheduler, `kill <pid>`) is the fork's to handle: a training stage saves its
    checkpoint and exits with its own status."""
    pid_file, seen = stage / "fork.pid", stage / "seen"
    (stage / "stages" / "term.py").write_text(textwrap.dedent(f'''
        import os, signal, sys, time
        from telekd.forkserver import run_stage


        def main():
            signal.signal(signal.SIGTERM, lambda *_: (open({str(seen)!r}, "w").write("TERM"), sys.exit(7)))
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(60)


        if __name__ == "__main__":
            run_stage(main)
    '''))
    call = (f"{sys.executable} stages/term.py & c=$!; "
            f"for i in $(seq 100); do test -s {pid_file} && break; sleep 0.1; done; kill -TERM $c; wait $c")
    (forked,) = run_all(stage, [call])
    assert (forked["rc"], seen.read_text()) == (7, "TERM"), forked["err"]


def test_stages_of_two_commands_run_at_once(stage):
    """One server, two stages at the same time (two commands under one server): each gets its own fork, streams
    and exit status."""
    py = sys.executable
    call = f"{py} stages/fake.py exit 3 & a=$!; {py} stages/fake.py report < /dev/null; ra=$?; wait $a; echo $? $ra"
    (forked,) = run_all(stage, [call])
    lines = forked["out"].splitlines()
    assert json.loads(lines[0])["name"] == "__main__" and lines[1] == "3 0"


def test_a_malformed_request_is_refused_and_the_server_serves_on(stage):
    """A client that connects and sends nothing usable (it died, or is not run_stage) gets a refusal; the next
    stage is served as usual."""
    probe = (f"{sys.executable} -c \"import os, socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
             f"s.connect(os.environ['{forkserver.ENV}']); s.send(b'not json'); print(s.recv(4096).decode())\"")
    refused, served = run_all(stage, [probe, f"{sys.executable} stages/fake.py exit 3"])
    assert "expected run_stage's request" in refused["out"]
    assert served["rc"] == 3


def test_a_stop_of_the_whole_job_lets_the_running_stage_save(stage):
    """SIGTERM to the whole process group (a scheduler's pre-emption, `scancel`): the server stops accepting but lets
    the running fork handle its own SIGTERM (forwarded by its client) and exit with its own status."""
    pid_file, seen = stage / "fork.pid", stage / "seen"
    (stage / "stages" / "slow_term.py").write_text(textwrap.dedent(f'''
        import os, signal, sys, time
        from telekd.forkserver import run_stage


        def main():
            def save(*_):
                time.sleep(1)                      # finishing the step, writing the checkpoint
                open({str(seen)!r}, "w").write("saved")
                sys.exit(7)
            signal.signal(signal.SIGTERM, save)
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(60)


        if __name__ == "__main__":
            run_stage(main)
    '''))
    script = stage / "job.sh"
    script.write_text(f"{sys.executable} stages/slow_term.py > {stage}/out.txt 2>&1; echo $? > {stage}/rc.txt\n")
    job = subprocess.Popen([sys.executable, "-m", "telekd.forkserver", "--preload", "json", "bash", str(script)],
                           cwd=stage, start_new_session=True)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGTERM)
    job.wait(timeout=30)
    assert seen.read_text() == "saved"


def test_a_preload_module_that_fails_is_reported_and_the_stages_still_run(stage):
    script = stage / "one.sh"
    script.write_text(f"{sys.executable} stages/fake.py exit 3\n")
    p = subprocess.run([sys.executable, "-m", "telekd.forkserver", "--preload", "json,no_such_module_here", "bash",
                        str(script)], cwd=stage, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3
    assert "preloading no_such_module_here failed (ModuleNotFoundError" in p.stderr
