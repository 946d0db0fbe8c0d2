"""model.liger_kernels: a GPU-only option that stops CPU runs with what to do, and on a GPU computes the loss
the logits path does."""
import importlib.util

import pytest
import torch


def test_liger_kernels_fail_clearly_without_a_gpu(monkeypatch):
    from mtl_scale.errors import UserError
    from mtl_scale.kernels import apply_liger
    with pytest.raises(UserError, match="model.liger_kernels=true needs CUDA GPUs .* Set model.liger_kernels=false"):
        apply_liger("llama", on_cuda=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs the liger-kernel package \(pip install liger-kernel\)"):
        apply_liger("llama", on_cuda=True)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="Liger's kernels are Triton: a CUDA GPU and the liger-kernel package (bench/gpu_smoke.sh)")
def test_liger_fused_loss_equals_the_logits_path_on_gpu(tiny_model_dir, monkeypatch):
    """On a GPU, the Liger-patched Llama's fused linear cross-entropy (labels in, num_items_in_batch=1) gives
    the summed NLL and LoRA gradients that the unpatched model's logits give, padded and packed, and with the
    hidden states at the labelled positions only (logits_to_keep and shift_labels)."""
    import peft
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama
    from mtl_scale import batching
    from mtl_scale.data.formatting import collate, loss_positions, summed_loss
    from mtl_scale.kernels import apply_liger
    from token_examples import token_examples

    def lora(model):
        torch.manual_seed(0)  # the same LoRA init in both models
        return peft.get_peft_model(model.cuda(), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                                  init_lora_weights=False)).train()

    examples = [(ids, [-100] * (len(ids) // 3) + lab[len(ids) // 3:])  # a third of each unlabelled (prompts)
                for ids, lab in token_examples([37, 120, 9, 64, 200, 15])]
    batches = [collate(examples, pad_id=0), batching.collate_packed(examples, pad_id=0, row_tokens=256)]
    batches += [{**b, "loss_positions": loss_positions(b["labels"])} for b in batches]  # lm_head at labels only
    batches = [{k: v.cuda() for k, v in b.items()} for b in batches]

    def loss_and_grads(model, in_model):
        out = []
        for batch in batches:
            model.zero_grad()
            loss = summed_loss(model, batch, in_model)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        return out

    # the reference first: Liger patches modeling_llama's classes and functions in place, which the
    # reference's forward would then call too (each name is restored after the test by monkeypatch)
    reference = loss_and_grads(lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)), False)
    for name, value in list(vars(modeling_llama).items()):
        monkeypatch.setattr(modeling_llama, name, value)
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    apply_liger("llama", on_cuda=True)
    model = lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    assert type(model.get_base_model().model.norm).__name__ == "LigerRMSNorm"
    for (ref_loss, ref_grads), (loss, grads) in zip(reference, loss_and_grads(model, True)):
        assert ref_loss > 100  # a sum over ~300 labelled tokens of random ids, not a mean
        torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-5)
        for a, b in zip(ref_grads, grads):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
