"""A tiny random-weight Grounding DINO saved as a folder, for tests of the text-detection
path without the 700 MB checkpoint (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

# A BERT WordPiece vocabulary: the special tokens, "." (Grounding DINO's phrase end)
# and the words the tests say.
TINY_BERT_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "of", "photo",
                   "red", "hat", "man", "woman", "dog", "cat")


def tiny_grounding_dino(directory: str | Path, seed: int = 0) -> Path:
    """Write a Grounding DINO model and its processor (Swin backbone, BERT text
    encoder, all a few channels wide; 64 px images) to `directory`."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    directory = Path(directory)
    vocab_dir = directory / "vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(TINY_BERT_WORDS) + "\n")
    # from_pretrained reads vocab.txt under transformers 4 and 5 alike (5's constructor
    # takes `vocab=`, 4's `vocab_file=`).
    tokenizer = BertTokenizerFast.from_pretrained(vocab_dir)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(
            size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer)
    text_len = 32
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64, window_size=7, embed_dim=8, depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"],
            out_indices=[2, 3, 4]),
        text_config=BertConfig(
            vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=8, max_position_embeddings=text_len),
        # d_model is a multiple of 32 (the input projections' GroupNorm(32, d_model));
        # two decoder layers, since the box heads of layers 1.. are tied to layer 0's.
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=8, encoder_n_points=1, decoder_n_points=1, max_text_len=text_len,
        disable_custom_kernels=True)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
