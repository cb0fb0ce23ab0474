"""A byte-level BPE tokenizer trained on the demo task's corpus, saved as an ordinary HF tokenizer.

Why these choices:
- Byte level: any text round-trips (decode(encode(x)) == x), so no response is ever mangled.
- Digits are split one per token before BPE sees them, so "19" is ["1", "9"]: the model does
  arithmetic over digits, and the verifier's integers are never fused with neighbouring text.
- No post-processor: `encode` adds no special tokens. The bos token comes from the chat template
  only, so a prompt rendered by the template and encoded carries exactly one bos (no double bos).
- The chat template renders `<|role|>\\n content <|end|>\\n` per message; `<|end|>` is also eos, so a
  generation stops where a training completion ended.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, USER, ASSISTANT = "<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` (deterministic for the same texts) and wrap it for transformers.

    The special tokens take ids 0..4 in SPECIAL_TOKENS order (pad = 0); the 256 byte symbols follow,
    then the merges up to `vocab_size` (fewer if the corpus runs out of pairs to merge).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
    )
