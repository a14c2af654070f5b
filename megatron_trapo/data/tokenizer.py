"""Train a small byte-level BPE tokenizer locally (no download) and save it in HF format.

Used by the CPU demo and by tests, which must not fetch a tokenizer from a hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        special_tokens: List[str] = SPECIAL_TOKENS,
                        individual_digits: bool = False):
    """Train, wrap as ``PreTrainedTokenizerFast`` (eos ``<|endoftext|>``, Qwen-style chat
    template), save to ``out_dir`` and return it. ``individual_digits`` splits numbers into
    digits (as Qwen's and Llama 3's tokenizers do), which small models need for arithmetic."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level]) if individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<pad>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def stop_token_ids(tokenizer) -> List[int]:
    """Tokens that end a response: EOS, and the chat turn end where the vocabulary has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|eot_id|>") if t in vocab)
    return sorted(ids)
