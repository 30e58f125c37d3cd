"""Write a model directory with random weights from a named shape (valid for speed, not quality).

    python benchmarks/random_model.py llama-3-8b /tmp/llama-3-8b [--layers 3] [--device cuda]
    python benchmarks/random_model.py SRC DIR --dtype float32   # SRC's config.json (and tokenizer, if any)
    python benchmarks/random_model.py llama-3-8b /tmp/llama-3-8b --tokenizer   # + a word-level tokenizer

--tokenizer writes a word-level tokenizer covering the whole vocabulary (no hub here, and the
real one is not needed for timing), so a leader can serve the directory and `hetserve bench`
can build prompts of exact token lengths for it.

Only the shape matters for timing; `--layers` keeps fewer decoder layers (all layers of a model
are the same shape, so a profile of 3 layers is a profile of them all).
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
}


def word_tokenizer(vocab_size: int):
    """Words of English text first (so bench's synthetic prompts are real words), then w<i> fillers."""
    import re
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = (Path(__file__).resolve().parent.parent / "hetserve" / "data" / "calibration.txt").read_text()
    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]", text)))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words + [f"w{i}" for i in range(vocab_size)]:
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", help=f"one of {sorted(SHAPES)}, or a directory holding config.json")
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokenizer", action="store_true", help="also write a word-level tokenizer")
    args = parser.parse_args()
    if args.shape in SHAPES:
        config = LlamaConfig(**SHAPES[args.shape])
    else:
        config = AutoConfig.from_pretrained(args.shape)
    if args.layers:
        config.num_hidden_layers = args.layers
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    if args.tokenizer:
        word_tokenizer(config.vocab_size).save_pretrained(args.out)
    elif args.shape not in SHAPES and (Path(args.shape) / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(args.shape).save_pretrained(args.out)  # the source model's own
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
