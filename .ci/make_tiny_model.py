"""Write a tiny random-weight Qwen3 (4 layers, hidden 128) and a word-level tokenizer trained
here, so the real-vLLM tests serve a model without downloading one.

Run with the real-vLLM venv's Python (it has torch, transformers and tokenizers):
    python .ci/make_tiny_model.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

WORDS = (  # noqa: SIM905 (one readable line of words)
    "the a an of to in is was for on that with as by at from it this be are or have not "
    "prefetch ratio weight cache layer stream vector matmul attention token model server bench "
    "query key value gate up down norm quant scale batch sequence decode prefill kernel memory"
).split()


def corpus() -> list[str]:
    """Deterministic sentences over WORDS (plus digits), enough for a word-level vocabulary."""
    lines = []
    for i in range(2000):
        words = [WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(12)]
        lines.append(" ".join([*words, str(i % 100)]))
    return lines


def make_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = ["<unk>", "<pad>", "<|endoftext|>"]
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=special))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    fast.model_max_length = 512
    fast.save_pretrained(out)
    return int(tok.get_vocab_size())


def make_model(out: Path, vocab_size: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        torch_dtype="bfloat16",
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1).save_pretrained(out)


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out)
    make_model(out, vocab)
    print(f"tiny Qwen3 written to {out} (vocab {vocab})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
