"""Text side: a tiny CLIP tokenizer/encoder for tests, and the subject's textual-inversion token.

Textual inversion (Gal et al. 2022; MVCustom's V*, PAPER.md §3) learns one new word embedding.
Rather than unfreezing the whole embedding matrix and masking gradients, the text encoder's token
embedding is replaced by :class:`SubjectEmbedding`: the pretrained matrix stays frozen and the new
rows are a separate parameter, so "the trainable parameters" are exactly the new vectors (also
under ZeRO, which shards whole parameters). :func:`save_textual_inversion` writes the format
diffusers' ``load_textual_inversion`` reads (``{token: vector}`` in
``learned_embeds.safetensors``), so a stock Stable Diffusion pipeline can use the token.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

TEXT_INVERSION_FILE = "learned_embeds.safetensors"


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable unicode character per byte value."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer():
    """A working CLIP tokenizer with a character-level vocabulary (no merges, no download).

    Every byte is a token (with and without CLIP's ``</w>`` end-of-word suffix), so any text
    tokenizes; real runs load SD 1.5's tokenizer with ``from_pretrained``.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_text_encoder_config(vocab_size: int) -> dict:
    """A 2-layer, 32-wide CLIP text encoder config (the shape SD's pipelines expect)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


class SubjectEmbedding(nn.Module):
    """A token embedding = frozen pretrained rows + trainable rows for the new subject tokens."""

    def __init__(self, base: nn.Embedding, num_new: int):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.extra = nn.Parameter(torch.zeros(num_new, base.embedding_dim, dtype=base.weight.dtype))

    @property
    def weight(self) -> Tensor:
        """The full ``(vocab + new, dim)`` matrix (what ``get_input_embeddings().weight`` means)."""
        return torch.cat([self.base.weight, self.extra.to(self.base.weight.dtype)], 0)

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.extra.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: Tensor) -> Tensor:
        n = self.base.num_embeddings
        is_new = input_ids >= n
        out = self.base(input_ids.clamp(max=n - 1))
        # always in the graph, also for prompts without a new token: its gradient is then zeros,
        # never None. Under ZeRO-2 a rank whose batch lacks the token (an empty prompt from
        # caption dropout) would otherwise reduce one tensor fewer than the others, and the
        # mismatched all-reduce crashed gloo ("op.preamble.length") on 2 CPU workers.
        extra = F.embedding((input_ids - n).clamp(min=0), self.extra.to(out.dtype))
        return torch.where(is_new.unsqueeze(-1), extra, out)


def add_subject_tokens(
    tokenizer, text_encoder, tokens: list[str], init_words: list[str] | None = None
) -> list[int]:
    """Add ``tokens`` to the tokenizer and give the text encoder trainable rows for them.

    Args:
        tokens: new tokens, e.g. ``["<sks>"]``; each must be new to the tokenizer.
        init_words: per token, a word whose embedding (mean over its sub-tokens) initialises it
            (textual inversion's "initializer token"); default: small random vectors.
    Returns:
        the new tokens' ids.
    """
    if not tokens:
        return []
    if init_words is not None and len(init_words) != len(tokens):
        raise ValueError(f"init_words has {len(init_words)} entries for {len(tokens)} tokens")
    vocab_before = len(tokenizer)
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise ValueError(f"subject tokens {tokens} must be new to the tokenizer (only {added} were added)")
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    embeddings = text_encoder.get_input_embeddings()
    if isinstance(embeddings, SubjectEmbedding):
        raise ValueError("the text encoder already carries subject tokens; add all tokens in one call")
    if embeddings.num_embeddings != vocab_before or ids != list(
        range(vocab_before, vocab_before + len(tokens))
    ):
        raise ValueError(
            f"the text encoder's vocabulary ({embeddings.num_embeddings}) does not match the "
            f"tokenizer's ({vocab_before}); use the tokenizer saved with this text encoder"
        )
    wrapped = SubjectEmbedding(embeddings, len(tokens))
    text_encoder.set_input_embeddings(wrapped)
    init_subject_rows(tokenizer, text_encoder, init_words)
    return ids


def init_subject_rows(tokenizer, text_encoder, init_words: list[str] | None = None) -> None:
    """(Re)initialise the subject rows from the current pretrained rows: each to the mean
    embedding of its ``init_words`` entry, or to random vectors of the vocabulary's scale."""
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, SubjectEmbedding):
        raise ValueError("the text encoder carries no subject tokens")
    with torch.no_grad():
        if not init_words:
            emb.extra.normal_(0, float(emb.base.weight.std()))
            return
        for row, word in enumerate(init_words):
            word_ids = tokenizer(word, add_special_tokens=False).input_ids
            if not word_ids:
                raise ValueError(f"initializer word {word!r} tokenizes to nothing")
            emb.extra[row] = emb.base.weight[word_ids].mean(0)


def subject_vectors(tokenizer, text_encoder) -> dict[str, Tensor]:
    """``{token: vector}`` of the subject tokens a text encoder carries."""
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, SubjectEmbedding):
        return {}
    first = emb.base.num_embeddings
    ids = range(first, first + emb.extra.shape[0])
    return {tokenizer.convert_ids_to_tokens(i): emb.extra[i - first].detach().clone() for i in ids}


def save_textual_inversion(tokenizer, text_encoder, path: str, token: str | None = None) -> str:
    """Write one subject token in diffusers' textual-inversion format; returns the file path.

    ``path`` is a folder (the file is ``learned_embeds.safetensors`` in it) or a ``.safetensors``
    file. Load it with ``pipe.load_textual_inversion(path)`` in any SD 1.x pipeline whose text
    encoder has the same width.
    """
    from safetensors.torch import save_file

    vectors = subject_vectors(tokenizer, text_encoder)
    if not vectors:
        raise ValueError("the text encoder carries no subject token to save")
    if token is None:
        if len(vectors) != 1:
            raise ValueError(f"several subject tokens {sorted(vectors)}; name the one to save")
        token = next(iter(vectors))
    if token not in vectors:
        raise ValueError(f"no subject token {token!r}; have {sorted(vectors)}")
    file = path if path.endswith(".safetensors") else os.path.join(path, TEXT_INVERSION_FILE)
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    save_file({token: vectors[token].float().contiguous()}, file)
    return file
