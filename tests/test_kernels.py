"""model.liger_kernels: a GPU-only option that stops CPU runs with what to do."""
import pytest


def test_liger_kernels_fail_clearly_without_a_gpu(monkeypatch):
    from mtl_scale.errors import UserError
    from mtl_scale.kernels import apply_liger
    with pytest.raises(UserError, match="model.liger_kernels=true needs CUDA GPUs .* Set model.liger_kernels=false"):
        apply_liger("llama", on_cuda=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs the liger-kernel package \(pip install liger-kernel\)"):
        apply_liger("llama", on_cuda=True)
