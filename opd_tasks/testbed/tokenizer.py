"""The testbed tokenizer: a fixed 127-token word-level vocabulary built with `tokenizers`.

Pre-tokenization (one regex, GPT-style: a space attaches to the word or punctuation mark after it):
- the task's words `so thus hence therefore then and the answer is Q`, optionally with a leading space,
  are single tokens (` then`, ` hence`), so choosing a style variant is choosing one token;
- `; , = : . + ?` optionally with a leading space are single tokens (` ;`);
- every other character is its own token: each digit, a lone space (e.g. before a digit), `\n`, letters.
Printable ASCII, `\n` and `\t` round-trip exactly; other characters become `<unk>`.

Special tokens: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3. Encoding with special tokens prepends `<bos>`
(never appends `<eos>`: a training example ends with an explicit `eos_token_id`). Decoding concatenates tokens
(`Fuse`), so `decode(encode(text)) == text`; `clean_up_tokenization_spaces` is off.

Saved as a `PreTrainedTokenizerFast` with `padding_side="left"`, the side batched generation needs; a
training loop that pads by hand (as `train.py` does) is unaffected.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
WORDS: tuple[str, ...] = ("so", "thus", "hence", "therefore", "then", "and", "the", "answer", "is", "Q")
SPACED_PUNCT = ";,=:.+?"
MODEL_MAX_LENGTH = 256

_WORD_ALT = "|".join(sorted(WORDS, key=len, reverse=True))
PRETOKENIZE_PATTERN = (
    rf"(?: |(?<![A-Za-z]))(?:{_WORD_ALT})(?![A-Za-z])"  # a whole word, with or without a leading space
    rf"| ?[{SPACED_PUNCT}]"  # punctuation, with or without a leading space
    r"|[\s\S]"  # anything else: one character
)


def vocabulary() -> dict[str, int]:
    """The fixed vocabulary: specials, printable ASCII + newline + tab, spaced punctuation, words."""
    tokens = list(SPECIALS)
    tokens += [c for c in string.printable if c not in "\r\x0b\x0c"]  # 95 printable + \t \n
    tokens += [" " + p for p in SPACED_PUNCT]
    for w in WORDS:
        tokens += [w, " " + w]
    tokens = list(dict.fromkeys(tokens))  # "Q" is also a printable character
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Save the tokenizer (tokenizer.json + tokenizer_config.json) for `AutoTokenizer.from_pretrained`.

    The config names the class `PreTrainedTokenizerFast`, which transformers 4.x (e.g. inside vLLM) and 5.x
    both know; transformers 5 would otherwise write its new `TokenizersBackend`.
    """
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return tok
