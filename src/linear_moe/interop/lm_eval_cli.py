"""``python -m linear_moe.interop.lm_eval_cli ...``: lm-eval's own command line with the ``linear_moe``
model registered and the shipped tasks on ``--include_path``; every lm-eval option works as usual::

    python -m linear_moe.interop.lm_eval_cli --model linear_moe --model_args pretrained=DIR --tasks linear_moe_tiny
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from .harness import TASKS_DIR  # noqa: F401  (importing registers the adapter)

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args and args[:1] not in (["ls"], ["validate"], ["-h"], ["--help"]):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


if __name__ == "__main__":
    main()
