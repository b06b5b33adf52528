"""Tiny Llama configs of the testbed teacher and student (transformers `LlamaConfig`)."""

from __future__ import annotations

from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from opd_tasks.testbed.tokenizer import MODEL_MAX_LENGTH

#: Teacher: the calibrated size (4 layers, hidden 128, 4 heads, FFN 512): 1.08M parameters.
TEACHER_SHAPE = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512)
#: Student: narrower (hidden 64, FFN 256), same depth: 0.28M parameters; also trained far shorter.
STUDENT_SHAPE = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=256)


def llama_config(tokenizer: PreTrainedTokenizerBase, **shape: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MODEL_MAX_LENGTH,
        num_key_value_heads=shape["num_attention_heads"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )


def make_model(tokenizer: PreTrainedTokenizerBase, role: str, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised teacher or student (`role`), float32, with its generation config set."""
    import torch

    shape = {"teacher": TEACHER_SHAPE, "student": STUDENT_SHAPE}[role]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, **shape))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    return model
