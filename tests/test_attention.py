"""model.attn_implementation=sdpa_varlen (mtl_scale/attention.py): packed rows attended per example give
what transformers' sdpa with its block-diagonal mask gives, values and gradients; everything else is sdpa."""
import copy

import pytest
import torch

from mtl_scale import attention, batching
from mtl_scale.data.formatting import collate, model_inputs, token_loss_sum
from token_examples import token_examples


def test_segments_start_where_positions_restart():
    assert attention.segments([0, 1, 2, 0, 1, 0]) == [(0, 3), (3, 5), (5, 6)]
    assert attention.segments([0, 1, 2, 3]) == [(0, 4)]
    assert attention.segments([0, 0]) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="must start at 0"):
        attention.segments([1, 2, 0])


def test_row_segments_are_read_once_per_position_tensor_and_never_for_another():
    """Every layer gets the same position_ids tensor: its segments are read once (one host sync per forward
    on a GPU, not one per layer), and read again for an in-place write or for any other tensor."""
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    first = attention.row_segments(pos, 1)
    assert first == [[(0, 3), (3, 5)]]
    assert attention.row_segments(pos, 1) is first
    other = torch.tensor([[0, 1, 0, 1, 2]])  # the same shape and version counter, another tensor
    assert other._version == pos._version and attention.row_segments(other, 1) == [[(0, 2), (2, 5)]]
    assert attention.row_segments(other, 2) == [[(0, 2), (2, 5)], [(0, 2), (2, 5)]]  # (1, T) broadcast to B rows
    pos[0, 2] = 0
    assert attention.row_segments(pos, 1) == [[(0, 2), (2, 3), (3, 5)]]
    with torch.inference_mode():  # inference tensors keep no version counter: read, never cached
        frozen = torch.tensor([[0, 1, 0]])
        assert attention.row_segments(frozen, 1) == [[(0, 2), (2, 3)]]


def test_each_example_runs_the_fused_kernel_and_its_backward_copies_nothing_per_example():
    """What makes it cheaper than the dense mask on CPU: 4-D inputs (3-D ones run sdpa's unfused math path),
    and split/cat rather than slices (a slice's backward writes a zero tensor of the whole row per example)."""
    from torch.profiler import profile

    q, k, v = (torch.randn(2, 4, 24, 8, requires_grad=True) for _ in range(3))
    pos = torch.tensor([list(range(10)) + list(range(6)) + list(range(8)),
                        list(range(3)) + list(range(21))])
    with profile() as prof:
        out, _ = attention.sdpa_varlen_forward(None, q, k, v, None, position_ids=pos)
        out.sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names
    assert not any("SliceBackward" in n for n in names), sorted(n for n in names if "Backward" in n)
    assert out.shape == (2, 24, 4, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q[1:, :, 3:].detach(), k[1:, :, 3:].detach(),
                                                           v[1:, :, 3:].detach(), is_causal=True)
    torch.testing.assert_close(out[1, 3:], ref[0].transpose(0, 1))


def _models(path_or_config):
    """The same weights under sdpa and sdpa_varlen, fp32, train mode."""
    from transformers import AutoModelForCausalLM
    attention.register()
    out = {}
    for impl in ("sdpa", attention.NAME):
        torch.manual_seed(0)
        if isinstance(path_or_config, str):
            out[impl] = AutoModelForCausalLM.from_pretrained(path_or_config, attn_implementation=impl,
                                                             dtype=torch.float32)
        else:  # from_config writes the implementation into the config it is given: one copy each
            out[impl] = AutoModelForCausalLM.from_config(copy.deepcopy(path_or_config), attn_implementation=impl,
                                                         dtype=torch.float32)
        assert out[impl].config._attn_implementation == impl
        out[impl].config.use_cache = False
        out[impl].train()
    return out


def _gqa_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize("which", ["tiny", "gqa"])
def test_packed_rows_equal_sdpa_with_its_block_diagonal_mask(which, tiny_model_dir):
    """Logits, summed loss and every weight's gradient, rows holding several examples and right padding
    (its own sequence), with GQA (2 KV heads for 4) and without."""
    models = _models(str(tiny_model_dir) if which == "tiny" else _gqa_config())
    examples = token_examples([7, 12, 5, 9, 16, 3, 11, 40, 1, 60])
    batch = batching.collate_packed(examples, pad_id=0, row_tokens=64)
    assert batch["input_ids"].shape[0] > 1 and (batch["position_ids"] == 0).sum() > len(examples)  # padded rows
    out = {}
    for impl, model in models.items():
        logits = model(**model_inputs(batch)).logits
        loss, _ = token_loss_sum(logits, batch["labels"])
        loss.backward()
        out[impl] = logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = out["sdpa"], out[attention.NAME]
    real = batch["token_mask"].bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-6)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():  # float32 sums over ~220 tokens: tolerance relative to the largest entry
        ref = ref_grads[name]
        torch.testing.assert_close(g, ref, atol=1e-6 * float(ref.abs().max()) + 1e-7, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_padded_batches_and_generation_run_sdpa_unchanged(tiny_model_dir):
    """A batch with an attention mask (padded micro-batches, evaluation) runs transformers' sdpa, and greedy
    generation (prefill per example, then cached decoding on sdpa) continues as sdpa's does."""
    models = _models(str(tiny_model_dir))
    examples = token_examples([7, 12, 5, 20])
    padded = collate(examples, pad_id=0)
    with torch.no_grad():
        a, b = (models[i](**model_inputs(padded)).logits for i in ("sdpa", attention.NAME))
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    prompt = torch.tensor([examples[3][0]])
    greedy = [m.eval().generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True) for m in models.values()]
    assert greedy[0].shape[1] == prompt.shape[1] + 8 and torch.equal(greedy[0], greedy[1])


def test_a_forward_continuing_a_cache_without_a_mask_runs_sdpa():
    """A chunk of several new tokens after a cached prefix, no attention mask (chunked prefill): sdpa's
    offset causal mask, not a causal triangle over the new tokens alone."""
    from transformers import DynamicCache
    config = _gqa_config()
    ids = torch.randint(5, 250, (1, 20), generator=torch.Generator().manual_seed(0))
    for impl, model in _models(config).items():
        model.eval()
        with torch.no_grad():
            full = model(ids).logits[:, 12:]
            cache = DynamicCache(config=config)
            model(ids[:, :12], past_key_values=cache, use_cache=True)
            chunk = model(ids[:, 12:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(chunk, full, atol=1e-5, rtol=1e-5, msg=lambda m, impl=impl: f"{impl}: {m}")


def test_models_whose_attention_is_not_full_causal_are_refused():
    from transformers import Gemma2Config, MistralConfig, Qwen2Config
    from mtl_scale.errors import UserError
    with pytest.raises(UserError, match="sdpa_varlen computes full causal attention per example; this mistral "
                                        "model has sliding_window=4096. Use sdpa or flash_attention_2"):
        attention.check_model(MistralConfig(sliding_window=4096))
    with pytest.raises(UserError, match="no attention logit soft-capping .*gemma2"):
        attention.check_model(Gemma2Config(sliding_window=None))
    attention.check_model(MistralConfig(sliding_window=None))
    attention.check_model(Qwen2Config(use_sliding_window=False, sliding_window=4096))  # the window is off
    attention.check_model(_gqa_config())


def _releases():
    """``varlen_attn``'s signatures across torch releases, as this module must call them."""
    def first(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        pass

    def scaled(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, *, return_aux=None,
               scale=None):
        pass

    def windowed(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), k_cache=None):
        pass

    def gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False):
        pass
    return first, scaled, windowed, gqa


def test_each_torch_release_of_varlen_attn_is_called_as_it_takes_causal_and_gqa():
    first, scaled, windowed, gqa = _releases()
    K = attention.VarlenKernel
    assert attention.kernel_from(first, has_backward=True) is None  # no scale: Gemma's would be wrong
    assert attention.kernel_from(scaled, has_backward=True) == K(scaled, {"is_causal": True}, False)
    both = lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, *, scale=None, \
        window_size=(-1, -1): None  # noqa: E731 (where both exist, causal without a window is is_causal)
    assert attention.kernel_from(both, has_backward=True).causal == {"is_causal": True}
    assert attention.kernel_from(windowed, has_backward=True) == K(windowed, {"window_size": (-1, 0)}, False)
    assert attention.kernel_from(gqa, has_backward=True) == K(gqa, {"window_size": (-1, 0)}, True)
    assert attention.kernel_from(gqa, has_backward=False) is None  # forward only: cannot train
    from torch.nn.attention import varlen  # the installed torch's: CUDA-only, but its signature is read
    expected = attention.kernel_from(varlen.varlen_attn, hasattr(varlen, "_varlen_attn_backward"))
    assert attention.torch_varlen() == expected
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):  # this machine's
        assert expected == K(varlen.varlen_attn, {"window_size": (-1, 0)}, True)


def test_the_varlen_kernel_is_used_only_where_flash_runs():
    """Everything here returns before asking a GPU anything (this machine has none)."""
    assert attention.varlen_kernel("cpu", torch.bfloat16, 64) is None
    assert attention.varlen_kernel("cuda", torch.float32, 64) is None
    assert attention.varlen_kernel("cuda", torch.bfloat16, 64, dropout=0.1) is None
    assert attention.varlen_kernel("cuda", torch.bfloat16, 12) is None  # flash: head size a multiple of 8
    assert attention.varlen_kernel("cuda", torch.float16, 512) is None  # ... and at most 256
    assert attention.packed_kernel("cpu", torch.float32, 64) == "one sdpa call per example"


def test_cu_seqlens_lay_the_rows_end_to_end():
    assert attention.cu_seqlens([[(0, 3), (3, 5)], [(0, 5)], [(0, 1), (1, 2), (2, 5)]], 5) == \
        ([0, 3, 5, 10, 11, 12, 15], 5)
    assert attention.cu_seqlens([[(0, 2), (2, 6)]], 6) == ([0, 2, 6], 4)
    segs = [[(0, 2), (2, 6)]]  # the device copy: once per forward (every layer gets this same list)
    cu, longest = attention._device_cu_seqlens(segs, 6, torch.device("cpu"))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 6] and longest == 4
    assert attention._device_cu_seqlens(segs, 6, torch.device("cpu"))[0] is cu
    assert attention._device_cu_seqlens([[(0, 2), (2, 6)]], 6, torch.device("cpu"))[0] is not cu  # a new forward


def _reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                           window_size=(-1, -1), is_causal=False, enable_gqa=False):
    """What torch's varlen_attn computes (its docstring), on any device: (T, H, D) tokens, cu_seqlens."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and max_q == max_k
    bounds = cu_seq_q.tolist()
    assert max_q == max(e - s for s, e in zip(bounds, bounds[1:]))
    causal = window_size == (-1, 0) or is_causal
    assert causal and window_size in ((-1, 0), (-1, -1))
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(x[s:e].transpose(0, 1).unsqueeze(0) for x in (query, key, value)), is_causal=True, scale=scale,
        enable_gqa=enable_gqa)[0].transpose(0, 1) for s, e in zip(bounds, bounds[1:])])


def test_varlen_kwargs_give_each_packed_example_its_bounds_in_the_rows_end_to_end():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])  # the second row ends in one padding position
    kw = attention.varlen_kwargs(pos)
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10]
    assert kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"] and kw["max_length_q"] == kw["max_length_k"] == 4
    batch = {"input_ids": pos, "position_ids": pos, **kw}
    assert model_inputs(batch) == {"input_ids": pos, "position_ids": pos, "use_cache": False, **kw}
    from mtl_scale.engine import to_device
    moved = to_device(batch, "meta")  # the engine's move: each tensor once, the lengths as they are
    assert moved["cu_seq_lens_q"] is moved["cu_seq_lens_k"] and moved["cu_seq_lens_q"].is_meta
    assert moved["max_length_q"] == 4 and moved["input_ids"].is_meta


@pytest.mark.parametrize("release", ["windowed", "gqa"])
def test_one_varlen_call_equals_one_sdpa_per_example(release):
    """The layout around the kernel: heads-major in, tokens of all rows end to end, KV heads repeated where
    the release takes no enable_gqa, (B, T, H, D) out; values and gradients, GQA (2 KV heads for 4), a
    scale that is not the head size's; the bounds read from the position ids or given by the engine."""
    fn = dict(zip(["first", "scaled", "windowed", "gqa"], _releases()))[release]
    kernel = attention.kernel_from(fn, True)
    kernel = attention.VarlenKernel(_reference_varlen_attn, kernel.causal, kernel.gqa)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 24, 8, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, 24, 8, generator=g).requires_grad_() for _ in range(2))
    pos = torch.tensor([list(range(10)) + list(range(6)) + list(range(8)),
                        list(range(3)) + list(range(21))])
    out = {}
    for path, use, given in (("kernel", kernel, {}), ("kernel, bounds given", kernel, attention.varlen_kwargs(pos)),
                             ("per example", None, {})):
        for x in (q, k, v):
            x.grad = None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(attention, "varlen_kernel", lambda *a, **kw: use)
            o, _ = attention.sdpa_varlen_forward(None, q, k, v, None, scaling=0.3, position_ids=pos, **given)
        (o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum().backward()
        out[path] = o.detach(), [x.grad.clone() for x in (q, k, v)]
    assert out["kernel"][0].shape == (2, 24, 4, 8)
    for path in ("kernel", "kernel, bounds given"):
        torch.testing.assert_close(out[path][0], out["per example"][0])
        for a, b in zip(out[path][1], out["per example"][1]):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available() or attention.varlen_kernel("cuda", torch.bfloat16, 64) is None,
                    reason="torch's flash varlen kernel needs a CUDA GPU of compute capability 8.0+")
def test_the_flash_varlen_kernel_equals_one_sdpa_per_example_on_gpu():
    """The real kernel (CUDA only: run on a lent GPU), bf16, GQA: values and gradients as the per-example
    loop gives them, and the kernel is what ran."""
    from torch.profiler import profile
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    pos = torch.tensor([list(range(100)) + list(range(56)) + list(range(100)),
                        list(range(30)) + list(range(200)) + list(range(26))], device="cuda")
    weight = torch.linspace(-1, 1, 2 * 256 * 8 * 64, device="cuda").view(2, 256, 8, 64)
    given = {name: x.cuda() if torch.is_tensor(x) else x for name, x in attention.varlen_kwargs(pos.cpu()).items()}
    out = {}
    for path, kwargs in (("kernel", {}), ("kernel, bounds given", given), ("per example", {})):
        for x in (q, k, v):
            x.grad = None
        with pytest.MonkeyPatch.context() as mp, profile() as prof:
            if path == "per example":
                mp.setattr(attention, "varlen_kernel", lambda *a, **kw: None)
            o, _ = attention.sdpa_varlen_forward(None, q, k, v, None, scaling=0.3, position_ids=pos,  # not 64**-0.5
                                                 **kwargs)
            (o.float() * weight).sum().backward()
        names = {e.name for e in prof.events()}  # sdpa's flash backend runs flash too: the op's name tells
        assert any("_varlen_attn" in n for n in names) == (path != "per example"), sorted(names)
        out[path] = o.detach().float(), [x.grad.float() for x in (q, k, v)]
    for path in ("kernel", "kernel, bounds given"):
        torch.testing.assert_close(out[path][0], out["per example"][0], atol=2e-2, rtol=2e-2)
        for a, b in zip(out[path][1], out["per example"][1]):
            torch.testing.assert_close(a, b, atol=2e-2 * float(b.abs().max()), rtol=2e-2)


def _reference_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                      deterministic=False):
    """flash-attn's flash_attn_varlen_func as documented, on any device: (total, H, D) tokens, cu_seqlens."""
    assert causal and not dropout_p and not softcap and window_size == (-1, -1)
    return _reference_varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=True,
                                  scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])


def _reference_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                               softcap=0.0, deterministic=False):
    """flash-attn's flash_attn_func: (B, T, H, D), causal over each whole row."""
    assert causal and not dropout_p
    return torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, scale=softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def test_flash_attention_2_packed_rows_attend_per_example_with_the_engines_bounds(monkeypatch):
    """transformers' flash_attention_2 path (its own code; flash-attn's two functions replaced by references
    of what they compute, since the package is CUDA-only) on a packed micro-batch of several rows: from the
    position ids alone it looks for packed examples in a single row only, so attention crosses examples;
    with the engine's varlen_kwargs the logits and every gradient are sdpa's block-diagonal ones."""
    from transformers import modeling_flash_attention_utils as fa_utils
    # what lazy_import_flash_attention returns, built from the references (its module globals untouched)
    loaded = ((_reference_flash_attn_func, _reference_flash_attn_varlen_func, None, fa_utils._pad_input,
               fa_utils._unpad_input), (fa_utils._lazy_define_process_function(_reference_flash_attn_varlen_func), dict))
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *a, **kw: loaded)
    models = _models(_gqa_config())
    flash = models.pop(attention.NAME)
    flash.load_state_dict(models["sdpa"].state_dict())
    flash.config._attn_implementation = "flash_attention_2"
    batch = batching.collate_packed(token_examples([7, 12, 5, 9, 16, 3, 11, 40, 1, 60]), pad_id=0, row_tokens=64)
    assert batch["input_ids"].shape[0] > 1
    real = batch["token_mask"].bool()
    out = {}
    given = {**batch, **attention.varlen_kwargs(batch["position_ids"])}
    for name, model, inputs in (("sdpa", models["sdpa"], batch), ("flash", flash, batch),
                                ("flash, bounds given", flash, given)):
        model.zero_grad()
        logits = model(**model_inputs(inputs)).logits
        token_loss_sum(logits, batch["labels"])[0].backward()
        out[name] = logits.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not torch.allclose(out["flash"][0], out["sdpa"][0], atol=1e-3)  # today's: across examples
    torch.testing.assert_close(out["flash, bounds given"][0], out["sdpa"][0], atol=1e-5, rtol=1e-5)
    for name, g in out["flash, bounds given"][1].items():
        ref = out["sdpa"][1][name]
        torch.testing.assert_close(g, ref, atol=1e-6 * float(ref.abs().max()) + 1e-7, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
