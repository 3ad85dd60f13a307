"""lm-evaluation-harness adapter, registered as ``linear_moe``.

From Python::

    import lm_eval
    from linear_moe.interop.harness import LinearMoELM, local_task_manager
    lm_eval.simple_evaluate(model=LinearMoELM(pretrained="DIR"), tasks=["linear_moe_tiny"],
                            task_manager=local_task_manager())

From the shell (lm-eval 0.4.13 has no plugin entry point for models, so this module must be imported
first; ``lm_eval_cli`` does that and adds the shipped task folder to ``--include_path``)::

    python -m linear_moe.interop.lm_eval_cli --model linear_moe --model_args pretrained=DIR --tasks linear_moe_tiny

Scores come from :func:`scoring.score_tokens`: requests are batched, and long inputs run in chunks that
carry the recurrent state, so rolling log-likelihoods continue the state instead of re-reading windows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .scoring import score_tokens

TASKS_DIR = Path(__file__).parent / "tasks"


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be an integer") from None


@register_model("linear_moe", "linear-moe")
class LinearMoELM(LM):
    """``LinearMoELM(pretrained=DIR)`` or ``LinearMoELM(model=model, tokenizer=tokenizer)``.

    ``pretrained`` is an exported directory, a checkpoint or a run directory; the tokenizer is found
    beside it unless given. ``max_length`` is the chunk length of one forward (not a context limit).
    """

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                 device: str | None = None, dtype: str | None = None, max_length: int | str = 2048,
                 max_gen_toks: int | str = 256, **unused):
        super().__init__()
        from ..data.tokenizer import Tokenizer, load_tokenizer
        from .hf import find_tokenizer_dir, from_pretrained

        if (pretrained is None) == (model is None):
            raise ValueError("LinearMoELM needs exactly one of pretrained=DIR or model=<LinearMoEForCausalLM>")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtypes = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"dtype={dtype!r} is not one of: {', '.join(k for k in dtypes if k)}")
        if model is None:
            model = from_pretrained(pretrained, device=self._device, dtype=dtypes[dtype])
            if tokenizer is None:
                tok_dir = find_tokenizer_dir(pretrained)
                if tok_dir is None:
                    raise ValueError(f"no tokenizer.json found beside {pretrained!r}; pass tokenizer=PATH")
                tokenizer = tok_dir
        if tokenizer is None:
            raise ValueError("LinearMoELM(model=...) also needs tokenizer= (a Tokenizer or a tokenizer.json path)")
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        self.model = model.to(self._device).eval()
        bs = str(batch_size)
        self.batch_size = 8 if bs.startswith("auto") else _int(batch_size, "batch_size")
        self.max_length = _int(max_length, "max_length")
        self.max_gen_toks = _int(max_gen_toks, "max_gen_toks")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError(f"batch_size={self.batch_size} and max_length={self.max_length} must be >= 1")

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- scoring -------------------------------------------------------------------------------------
    def _score(self, rows: list[list[int]], starts: list[int]) -> list[tuple[float, bool]]:
        """Sum of log-probs of ``row[start:]`` given ``row[:start]``, and whether all were greedy; batched
        longest-first so each batch pads little."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            logp, greedy = score_tokens(self.model, [rows[i] for i in idx], self.max_length, self.tokenizer.pad_id, self._device)
            for j, i in enumerate(idx):
                s = starts[i] - 1  # logp[t] scores token t + 1
                out[i] = (float(logp[j][s:].sum()), bool(greedy[j][s:].all()))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows, starts = [], []
        for req in requests:
            context, continuation = req.args
            # a trailing space belongs to the continuation (how BPE tokenizers split words)
            n_space = len(context) - len(context.rstrip())
            if n_space:
                context, continuation = context[:-n_space], context[-n_space:] + continuation
            ctx = self.tokenizer.encode(context) if context else []
            cont = self.tokenizer.encode(continuation)
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens")
            ctx = [self.tokenizer.eos_id] + ctx  # every text starts after an end-of-text, as in training
            rows.append(ctx + cont)
            starts.append(len(ctx))
        return self._score(rows, starts)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows = [[self.tokenizer.eos_id] + self.tokenizer.encode(req.args[0]) for req in requests]
        keep = [i for i, r in enumerate(rows) if len(r) > 1]
        scores = self._score([rows[i] for i in keep], [1] * len(keep))
        out = [0.0] * len(rows)
        for i, (lp, _) in zip(keep, scores):
            out[i] = lp
        return out

    # ---- generation ----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuation of each context (greedy, or sampled when the task sets ``do_sample`` / a
        ``temperature``), cut at the first ``until`` string. Requests with the same options share a batch
        whatever their prompt lengths (``model.generate`` decodes ragged prompts together); prompts are
        sorted by length so a batch's rows finish close together."""
        prepared = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _int(kwargs.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
            sampling = (0.0, 1.0, 0)  # greedy unless the task asks to sample
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                sampling = (float(kwargs.get("temperature", 1.0) or 1.0), float(kwargs.get("top_p", 1.0)), int(kwargs.get("top_k", 0)))
            ids = [self.tokenizer.eos_id] + self.tokenizer.encode(context)
            prepared.append((ids, tuple(until), max_new, sampling))
        groups: dict[tuple, list[int]] = {}
        for i, (ids, until, max_new, sampling) in sorted(enumerate(prepared), key=lambda item: len(item[1][0])):
            groups.setdefault((until, max_new, sampling), []).append(i)
        out = [""] * len(prepared)
        for (until, max_new, (temperature, top_p, top_k)), members in groups.items():
            for b in range(0, len(members), self.batch_size):
                idx = members[b:b + self.batch_size]
                prompts = [prepared[i][0] for i in idx]
                gen = self.model.generate(prompts, max_new, eos_id=self.tokenizer.eos_id, temperature=temperature,
                                          top_p=top_p, top_k=top_k)
                for j, i in enumerate(idx):
                    new = gen[j][len(prompts[j]):].tolist()
                    if self.tokenizer.eos_id in new:
                        new = new[:new.index(self.tokenizer.eos_id)]
                    text = self.tokenizer.decode(new)
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
        return out


def local_task_manager(extra_paths: list[str] | None = None, include_defaults: bool = True):
    """An lm-eval ``TaskManager`` that also knows the tasks shipped here (``linear_moe_tiny``).
    ``include_defaults=False`` skips indexing lm-eval's thousands of built-in task files (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR)] + list(extra_paths or []), include_defaults=include_defaults)


def run_lm_eval(pretrained: str, tasks: list[str] | str, *, num_fewshot: int | None = None, limit: int | float | None = None,
                batch_size: int = 8, device: str | None = None, include_path: list[str] | None = None,
                max_length: int = 2048) -> dict[str, Any]:
    """``linear-moe eval``: run lm-eval ``tasks`` on a model directory; returns ``{task: {metric: value}}``.

    ``tasks`` is a list or a comma-separated string; the shipped ``linear_moe_tiny`` task and any
    ``include_path`` folders of task YAMLs are known. Runs offline when the tasks' data are local.
    """
    import lm_eval

    names = [t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t]
    if not names:
        raise ValueError("tasks is empty; name at least one lm-eval task (e.g. linear_moe_tiny)")
    shipped = {p.stem for p in TASKS_DIR.glob("*/*.yaml")}
    # only shipped / included tasks: no need to index lm-eval's built-in ones
    defaults = not (set(names) <= shipped and not include_path)
    lm = LinearMoELM(pretrained=pretrained, batch_size=batch_size, device=device, max_length=max_length)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=local_task_manager(include_path, defaults), log_samples=False,
                                  bootstrap_iters=0)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in res["results"].items()}
