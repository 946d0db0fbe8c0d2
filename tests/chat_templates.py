"""Locally built chat tokenizers: the tiny model's tokenizer with a chat template and its
end-of-turn markers registered as special tokens (stand-ins for hub tokenizers we cannot load)."""
from transformers import AutoTokenizer

# ChatML (Qwen-style): every turn ends with <|im_end|> and a newline; no bos.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3: the template writes bos itself; turns end with <|eot_id|>, which is not eos.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

STYLES = {
    # name: (template, special tokens, the end-of-turn token, tokenizer attributes)
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", {"eos_token": "<|im_end|>"}),
    "chatml_own_eos": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", {}),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|eot_id|>",
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
}


def chat_tokenizer(model_dir, style: str):
    """A fresh tokenizer of ``style`` and its end-of-turn token id."""
    template, specials, end_of_turn, attrs = STYLES[style]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.add_tokens(specials, special_tokens=True)
    for key, value in attrs.items():
        setattr(tok, key, value)
    tok.chat_template = template
    return tok, tok.convert_tokens_to_ids(end_of_turn)


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
