"""A small byte-level BPE tokenizer for the demo base model, trained in memory.

Real runs use the base checkpoint's own tokenizer; the demo trains its tiny Llama from scratch
and needs one that knows the demo vocabulary. Byte-level BPE never produces an unknown token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path | str, special_tokens: dict[str, str] | None = None
) -> PreTrainedTokenizerBase:
    """Train BPE on ``texts``, save it to ``out_dir`` (offline-reloadable) and return it reloaded.

    ``special_tokens`` (role -> token, ids in that order from 0) defaults to the Llama layout.
    """
    specials = SPECIAL_TOKENS if special_tokens is None else special_tokens

    bpe = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, **specials)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out, local_files_only=True)
