"""Decoder-layer discovery on tiny models of every listed architecture, built from config (no downloads)."""

import pytest
import torch
from torch import nn

from owlore.layerwise.layers import active_layer_indices, find_decoder_layers, set_layers_trainable
from tests.conftest import tiny_llama_config

SMALL = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)


def _build(arch: str) -> tuple[nn.Module, type]:
    import transformers as T

    L = 3
    if arch == "llama":
        return T.LlamaForCausalLM(tiny_llama_config(L)), T.models.llama.modeling_llama.LlamaDecoderLayer
    if arch == "mistral":
        cfg = T.MistralConfig(intermediate_size=64, num_hidden_layers=L, num_key_value_heads=2, **SMALL)
        return T.MistralForCausalLM(cfg), T.models.mistral.modeling_mistral.MistralDecoderLayer
    if arch == "qwen2":
        cfg = T.Qwen2Config(intermediate_size=64, num_hidden_layers=L, num_key_value_heads=2, **SMALL)
        return T.Qwen2ForCausalLM(cfg), T.models.qwen2.modeling_qwen2.Qwen2DecoderLayer
    if arch == "gemma":
        cfg = T.GemmaConfig(intermediate_size=64, num_hidden_layers=L, num_key_value_heads=2, head_dim=8, **SMALL)
        return T.GemmaForCausalLM(cfg), T.models.gemma.modeling_gemma.GemmaDecoderLayer
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=96, n_embd=32, n_layer=L, n_head=4, n_positions=64)
        return T.GPT2LMHeadModel(cfg), T.models.gpt2.modeling_gpt2.GPT2Block
    if arch == "gpt_neox":
        cfg = T.GPTNeoXConfig(intermediate_size=64, num_hidden_layers=L, **SMALL)
        return T.GPTNeoXForCausalLM(cfg), T.models.gpt_neox.modeling_gpt_neox.GPTNeoXLayer
    if arch == "opt":
        cfg = T.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=L, num_attention_heads=4,
                          word_embed_proj_dim=32, max_position_embeddings=64)
        return T.OPTForCausalLM(cfg), T.models.opt.modeling_opt.OPTDecoderLayer
    if arch == "phi":
        cfg = T.PhiConfig(intermediate_size=64, num_hidden_layers=L, **SMALL)
        return T.PhiForCausalLM(cfg), T.models.phi.modeling_phi.PhiDecoderLayer
    raise AssertionError(arch)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox", "opt", "phi"])
def test_find_decoder_layers(arch):
    model, layer_cls = _build(arch)
    layers = find_decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == 3
    assert all(isinstance(layer, layer_cls) for layer in layers)


def test_find_inside_peft_model():
    from peft import LoraConfig, get_peft_model

    model, _ = _build("llama")
    layers = find_decoder_layers(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    found = find_decoder_layers(peft_model)
    assert found is layers
    assert any("lora_A" in n for n, _ in found[0].named_parameters())


def test_find_inside_llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=tiny_llama_config(2, vocab_size=256),
        image_token_id=255,
    )
    model = LlavaForConditionalGeneration(cfg)
    layers = find_decoder_layers(model)
    assert layers is model.model.language_model.layers  # the LM's blocks, not the vision tower's
    assert len(layers) == 2


def test_explicit_path_and_unknown_architecture_error():
    model, _ = _build("llama")
    assert find_decoder_layers(model, "model.layers") is model.model.layers

    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=r"model\.layers.*transformer\.h"):
        find_decoder_layers(Unknown())
    assert find_decoder_layers(Unknown(), path="blocks") is not None
    with pytest.raises(ValueError, match="not.there"):
        find_decoder_layers(Unknown(), path="not.there")


def test_no_eval_of_attribute_path():
    model, _ = _build("llama")
    with pytest.raises(ValueError):
        find_decoder_layers(model, path="__class__.__init__")


def test_set_layers_trainable():
    torch.manual_seed(0)
    model, _ = _build("llama")
    layers = find_decoder_layers(model)
    n = set_layers_trainable(layers, [0, 2])
    assert active_layer_indices(layers) == [0, 2]
    assert n == sum(p.numel() for i in (0, 2) for p in layers[i].parameters())
    assert model.model.embed_tokens.weight.requires_grad  # outside the blocks: untouched
    set_layers_trainable(layers, [1], param_filter=["mlp"])
    trainable = [n for n, p in layers[1].named_parameters() if p.requires_grad]
    assert trainable and all("mlp" in n for n in trainable)
    with pytest.raises(IndexError, match="out of range"):
        set_layers_trainable(layers, [3])
