"""The lm-eval adapter: scores equal a float64 step-by-step reference, chunked (state-carrying) scoring
equals one forward, generation matches greedy decoding, and the shipped task runs offline."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from linear_moe.interop.harness import LinearMoELM, run_lm_eval  # noqa: E402


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _reference_logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one prefix at a time, in float64."""
    m = model.double()
    total, greedy = 0.0, True
    with torch.no_grad():
        for t in range(start, len(ids)):
            logits = m(torch.tensor([ids[:t]])).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[ids[t]])
            greedy &= int(logits.argmax()) == ids[t]
    model.float()
    return total, greedy


def test_loglikelihood_matches_reference(tiny_model_dir):
    d, _ = tiny_model_dir
    lm = LinearMoELM(pretrained=str(d), batch_size=2, max_length=3, device="cpu")  # chunks of 3: the state carries
    tok = lm.tokenizer
    pairs = [("The sun rises in the", " east"), ("bees make", " honey, cows give milk."), ("", "water"),
             ("a week has seven ", "days")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        ctx_s = ctx.rstrip()
        cont_s = ctx[len(ctx_s):] + cont
        ids = [tok.eos_id] + (tok.encode(ctx_s) if ctx_s else [])
        want, want_greedy = _reference_logprob(lm.model, ids + tok.encode(cont_s), len(ids))
        assert lp == pytest.approx(want, rel=1e-4, abs=1e-4) and greedy == want_greedy


def test_rolling_carries_state_across_chunks(tiny_model_dir):
    d, model = tiny_model_dir
    texts = ["water left in a freezer turns into ice. " * 3, "a year has twelve months.", ""]
    chunked = LinearMoELM(pretrained=str(d), batch_size=3, max_length=4, device="cpu")
    whole = LinearMoELM(pretrained=str(d), batch_size=1, max_length=4096, device="cpu")
    a = chunked.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    b = whole.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    assert a[2] == 0.0 and b[2] == 0.0
    tok = chunked.tokenizer
    want, _ = _reference_logprob(chunked.model, [tok.eos_id] + tok.encode(texts[1]), 1)
    assert a == pytest.approx(b, rel=1e-4) and a[1] == pytest.approx(want, rel=1e-4)


def test_generate_until_is_greedy_and_stops(tiny_model_dir):
    d, model = tiny_model_dir
    lm = LinearMoELM(pretrained=str(d), batch_size=4, device="cpu")
    tok = lm.tokenizer
    prompts = ["the sun", "bees make", "the moon"]
    outs = lm.generate_until([_req("generate_until", p, {"until": [], "max_gen_toks": 6}) for p in prompts])
    for p, out in zip(prompts, outs):
        ids = torch.tensor([[tok.eos_id] + tok.encode(p)])
        new = lm.model.generate(ids, 6, eos_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        if tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        assert out == tok.decode(new)
    stop = outs[0][1:3] if len(outs[0]) >= 3 else None
    if stop:
        cut = lm.generate_until([_req("generate_until", prompts[0], {"until": [stop], "max_gen_toks": 6})])[0]
        assert cut == outs[0][:outs[0].index(stop)]


def test_shipped_task_runs_offline(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, _ = tiny_model_dir
    res = run_lm_eval(str(d), "linear_moe_tiny", batch_size=16, device="cpu")
    acc = res["linear_moe_tiny"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["linear_moe_tiny"]["sample_len"] == 32


def test_command_line_entry(tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "linear_moe.interop.lm_eval_cli", "--model", "linear_moe",
                           "--model_args", f"pretrained={d}", "--device", "cpu", "--tasks", "linear_moe_tiny", "--limit", "4"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "linear_moe_tiny" in proc.stdout and "acc" in proc.stdout


def test_bad_arguments(tiny_model_dir):
    d, model = tiny_model_dir
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        LinearMoELM()
    with pytest.raises(ValueError, match="batch_size='many' must be an integer"):
        LinearMoELM(pretrained=str(d), batch_size="many")
    with pytest.raises(ValueError, match="also needs tokenizer"):
        LinearMoELM(model=model)
    with pytest.raises(ValueError, match="tasks is empty"):
        run_lm_eval(str(d), "")


def test_shipped_task_data_is_well_formed():
    import json

    from linear_moe.interop.harness import TASKS_DIR

    rows = [json.loads(line) for line in (TASKS_DIR / "linear_moe_tiny" / "test.jsonl").read_text().splitlines()]
    assert len(rows) >= 24 and len({r["query"] for r in rows}) == len(rows)
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["gold"] < 4
