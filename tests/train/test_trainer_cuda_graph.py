"""train.cuda_graph: the trainer replays its step as one CUDA graph. Checked here: the settings it refuses
(on any machine), the learning-rate plumbing it relies on, and on a GPU that the graphed run's losses and
checkpoint match the eager run's (skipped on CPU; benchmarks/gpu_session.sh PARTS=tests runs it)."""
import pytest
import torch

from linear_moe.config import ConfigError
from linear_moe.train.checkpoint import list_checkpoints
from linear_moe.train.optim import lr_as_float, lr_as_tensor, set_lr
from linear_moe.train.trainer import train

from .test_trainer import job_for


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def test_refused_with_packing_pipeline_or_compile(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="train.cuda_graph needs data.packing=false"):
        job_for(tmp_path, data_dir, **{"train.cuda_graph": "true", "data.packing": "true"}).validate()
    with pytest.raises(ConfigError, match="pipeline parallelism or train.compile"):
        job_for(tmp_path, data_dir, **{"train.cuda_graph": "true", "train.compile": "true"}).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refused_without_a_cuda_device(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="train.cuda_graph needs one CUDA device"):
        train(job_for(tmp_path, data_dir, steps=2, **{"train.cuda_graph": "true", "train.device": "cpu"}), quiet=True)
    assert not (tmp_path / "runs").exists()


def test_lr_tensor_is_updated_in_place_and_saved_as_a_float():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    lr_as_tensor(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and opt.param_groups[0]["capturable"] is True
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.25  # same tensor: a captured graph reads it
    with lr_as_float(opt):
        assert opt.param_groups[0]["lr"] == 0.25 and not isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"] is lr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_run_matches_the_eager_run_and_resumes(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LINEAR_MOE_KERNEL_BACKEND", "torch")  # no fla autotuning in a unit test
    common = {"train.device": "cuda", "train.precision": "bf16", "train.grad_accum": 2, "train.log_interval": 1,
              "train.ckpt_interval": 4, "train.keep_last": 3}
    eager = train(job_for(tmp_path / "eager", data_dir, steps=8, **common), quiet=True)
    graphed = train(job_for(tmp_path / "graph", data_dir, steps=8, **common, **{"train.cuda_graph": "true"}), quiet=True)
    assert graphed.losses == pytest.approx(eager.losses, rel=2e-3)  # steps 1-2 eager, 3 captured, 4-8 replayed
    step4 = [c for c in list_checkpoints(graphed.run_dir) if c.name.endswith("4")]
    assert step4, list_checkpoints(graphed.run_dir)
    resumed = train(job_for(tmp_path / "graph", data_dir, steps=8, **common, **{"train.cuda_graph": "true"}),
                    resume=str(step4[0]), quiet=True)  # a graphed run resumed: the lr tensor and AdamW state restored
    assert resumed.step == 8 and resumed.losses == pytest.approx(graphed.losses[4:], rel=2e-3)
