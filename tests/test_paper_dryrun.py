"""The paper dry run in CI: the same code as bench/paper_dryrun.py at the real widths and vocabularies, one layer,
on the meta device; and the meta machinery's rules against hand-computed values."""

import sys
from pathlib import Path

import pytest
import torch

from telekd.meta import LiveBytes, ValueBoundary, tensor_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_live_bytes_peak_and_free():
    with LiveBytes("meta", baseline=100) as lb:
        a = torch.empty(1000, dtype=torch.float32, device="meta")    # 4,000 bytes
        b = torch.empty(500, dtype=torch.bfloat16, device="meta")    # 1,000 bytes
        v = a.view(10, 100)                                           # a view: no new storage
        del a, b, v
        c = torch.empty(250, dtype=torch.float32, device="meta")     # 1,000 bytes, after both were freed
        assert lb.current == 100 + 1000
    assert lb.peak == 100 + 4000 + 1000
    del c


def test_tensor_bytes_counts_weights_and_grads():
    lin = torch.nn.Linear(4, 3, device="meta", dtype=torch.bfloat16)   # 12 + 3 values, 2 bytes each
    assert tensor_bytes(lin) == 30
    lin.weight.grad = torch.empty_like(lin.weight)
    assert tensor_bytes(lin) == 54


def test_value_boundary_worst_case_and_host_reads():
    x = torch.empty(3, 5, device="meta")
    with ValueBoundary() as vb:
        assert x[x[:, 0] > 0].shape == (3, 5)              # mask indexing: every row selected
        assert (x > 0).nonzero().shape == (15, 2)
        assert x.sum().item() == 0 and not bool(x.sum() > 0)
        assert torch.equal(x.cpu(), torch.zeros(3, 5))     # values leaving the device: zeros on the host
    assert vb.counts == {"mask_index": 1, "nonzero": 1, "item": 2, "to_host": 1}


def test_cpu_tensor_in_meta_work_raises_like_a_gpu():
    """The fault class the dry run catches: a host-built mask mixed into device work."""
    x = torch.empty(2, 3, device="meta")
    with ValueBoundary(), pytest.raises(RuntimeError, match="expected device"):
        x.masked_fill(torch.ones(2, 3, dtype=torch.bool), 0.0)


@pytest.fixture(scope="module")
def dryrun():
    from telekd import vocab

    try:
        vocab.llama_gguf_file(), vocab.mistral_model_file()
    except vocab.VocabMissing as e:
        pytest.skip(f"paper vocabularies not installed: {e}")
    sys.path.insert(0, str(ROOT / "bench"))
    import paper_dryrun
    from telekd.params import load_params

    p = load_params(ROOT / "params.yaml").model_copy(update={"profile": "paper"})
    # real TeleQuAD when imported, else the repository's sample (same schema and code path; CI has no import)
    data = None if Path(paper_dryrun.TELEQUAD).exists() else str(ROOT / "data/sample/telequad-sample.json")
    return p, paper_dryrun.run(p, layers=1, data=data)


def test_every_paper_step_runs_on_meta_at_real_widths(dryrun):
    """Before the fix, kd_cma_mistral raised 'Tensor on device meta is not on the expected device cpu'
    (cma_term built its masks on the CPU), the crash every CMA cell meets on a GPU."""
    p, out = dryrun
    assert set(out["steps"]) == {"sft_llama", "sft_student", "cache_llama", "cache_mistral", "kd_vanilla_llama", "kd_dskd_llama",
                                 "kd_vanilla_mistral", "kd_cma_mistral", "generate_student", "generate_llama"}
    t = p.active.train
    assert (out["micro_batch"], out["grad_accum"], out["dtype"]) == (t.batch_size, t.grad_accum, "bfloat16")
    for name in ("kd_vanilla_llama", "kd_dskd_llama", "kd_vanilla_mistral", "kd_cma_mistral"):
        assert out["steps"][name]["micro_batches"] == t.grad_accum          # one optimizer step of train_kd
    # one TinyLlama layer at real widths, bf16: embeddings + head, q/o (2048^2), k/v (2048 x 4 kv heads x 64),
    # the MLP (3 x 2048 x 5632) and three RMSNorms; the cached targets come on top
    student_1l = 2 * (2 * 32000 * 2048 + 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 3 * 2048)
    assert student_1l < out["steps"]["kd_vanilla_llama"]["resident_bytes"] < student_1l + 64 * 2**20


def test_flops_match_the_analytic_count(dryrun):
    """Teacher-cache forward FLOPs >= 2 x (matmul parameters) x tokens (attention adds the rest)."""
    _, out = dryrun
    s = out["steps"]["cache_llama"]
    d, ff, v = 4096, 11008, 32000
    matmul_params = 4 * d * d + 3 * d * ff + d * v          # one layer + head (the embedding lookup costs nothing)
    tokens = sum(out["batch_tokens"]) * s["forward_batches"]  # the longest batch bounds every batch
    assert s["flops"] <= 2 * matmul_params * tokens * 1.25
    assert s["flops"] >= 2 * matmul_params * tokens * 0.5


def test_generation_runs_max_new_tokens_steps(dryrun):
    p, out = dryrun
    g = out["steps"]["generate_student"]
    assert g["new_tokens"] == p.active.generate.max_new_tokens and g["host_reads"]["item"] >= g["new_tokens"]


def test_every_kd_term_keeps_its_tensors_on_the_student_device():
    """Each term (vanilla, DSKD, CMA, ULD) on meta logits with cached targets moved to meta: host-built masks
    or indices mixed into device work would raise (CMA's did before the fix)."""
    from telekd.cache import TeacherTargets
    from telekd.kd.dskd import cma_term, dskd_term, make_projectors
    from telekd.kd.uld import uld_term
    from telekd.kd.vanilla import vanilla_term
    from telekd.losses import Divergence
    from telekd.prompts import Example, collate

    def ex(n_prompt, answer):
        ids = list(range(1, n_prompt + 1)) + answer
        return Example("q", ids, [-100] * n_prompt + answer, n_prompt, "", "", "", False, True)

    s_exs, t_exs = [ex(4, [7, 8, 9]), ex(3, [5, 6])], [ex(5, [3, 4, 5]), ex(4, [6, 7])]
    pairs = [(s_exs[0], t_exs[0], [(3, 4), (4, 5), (5, 6)]), (s_exs[1], t_exs[1], [(2, 3), (3, 4)])]
    k, V, d_s, d_t = 4, 16, 8, 12
    n = 5
    targets = TeacherTargets(
        offsets=torch.tensor([0, 3, 5]), student_pos=torch.tensor([3, 4, 5, 2, 3]),
        logprobs=torch.full((n, k), -2.0), ids=torch.arange(k).repeat(n, 1), mapped_mass=torch.ones(n),
        answer_tokens=5, t_offsets=torch.tensor([0, 3, 5]), t_logprobs=torch.full((n, k), -2.0),
        t_ids=torch.arange(k).repeat(n, 1), hidden=torch.zeros(n, d_t), rest=torch.full((n,), -1.0),
        t_rest=torch.full((n,), -1.0), t_logprobs1=torch.full((n, k), -2.0), temperature=2.0, t_temperature=2.0).to("meta")
    assert targets.offsets.device.type == "cpu" and targets.logprobs.device.type == "meta"  # index data stays on the host
    kd = Divergence("forward_kl", 2.0, 0.1, 0.5)
    proj = make_projectors(d_s, d_t, cma=True).to("meta")
    s_head, t_head = torch.empty(V, d_s, device="meta"), torch.empty(V, d_t, device="meta")
    s_emb, t_emb = torch.empty(V, d_s, device="meta"), torch.empty(V, d_t, device="meta")
    batch = {key: v.to("meta") for key, v in collate(s_exs, 0).items()}
    logits = torch.empty(2, 7, V, device="meta", requires_grad=True)
    hidden = torch.empty(2, 7, d_s, device="meta", requires_grad=True)
    made = {"vanilla": vanilla_term(targets, pairs, kd),
            "dskd": dskd_term(targets, pairs, proj, s_head, t_head, kd),
            "cma": cma_term(targets, pairs, proj, s_emb, t_emb, s_head, t_head, kd),
            "uld": uld_term(targets, pairs, 1.0)}
    with ValueBoundary():
        for name, term in made.items():
            loss, _ = term(logits, hidden, batch, [0, 1])
            assert loss.device.type == "meta" and loss.dim() == 0, name
            loss.backward()
