"""Tiny random captioning models (Florence-2, BLIP, LLaVA) written with `save_pretrained`, so tests
and demos load them through the same `from_pretrained` path as a real checkpoint, offline.

    python -m data_tools.tiny_vlm llava /tmp/tiny-llava
    fluxtune data caption photos/ --model /tmp/tiny-llava     # random words, in a second

Each model has ~30k parameters and a vocabulary of whole words only, so a caption has exactly one
word per generated token (what the tests of --max-length count). Tokenizers are built from in-memory
vocabularies; image processors are the PIL ones (no torchvision needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

WORDS = ["a", "photo", "of", "the", "cat", "dog", "man", "woman", "tree", "car", "sky", "red", "blue",
         "green", "small", "big", "on", "in", "sits", "stands", "under", "near", "bright", "dark"]
KINDS = ("florence2", "blip", "llava")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
# Weights this large make a random model's next-token choice depend on its input, so captions vary.
INIT_STD = 1.0


def _florence2():
    from transformers import (BartConfig, BartTokenizer, CLIPImageProcessorPil, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor)

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + [f"Ġ{w}" for w in WORDS])}
    tok = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    text = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512,
                      init_std=INIT_STD, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                      forced_bos_token_id=None)
    # Four stages of stride 4, 2, 2, 2: a 64 px image gives 2x2 patches plus one pooled token.
    vision = dict(depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                  window_size=2, projection_dim=32, drop_path_rate=0.0, max_position_embeddings=8,
                  max_temporal_embeddings=4)
    config = Florence2Config(vision_config=vision, text_config=text.to_dict(), image_token_id=tok.image_token_id,
                             initializer_range=INIT_STD)
    images = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    return Florence2ForConditionalGeneration(config), Florence2Processor(image_processor=images, tokenizer=tok)


def _blip():
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS)}
    tok = BertTokenizer(vocab=vocab, bos_token="[DEC]")  # BLIP starts captions with [DEC], ends them with [SEP]
    text = dict(TEXT, vocab_size=len(tok), max_position_embeddings=512, initializer_range=INIT_STD,
                bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id)
    config = BlipConfig(text_config=text, vision_config=dict(TEXT, image_size=32, patch_size=8), projection_dim=32)
    images = BlipImageProcessorPil(size={"height": 32, "width": 32})
    return BlipForConditionalGeneration(config), BlipProcessor(image_processor=images, tokenizer=tok)


# ChatML with the image placeholder where the message lists an image, as real VLM templates do.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llava():
    from transformers import (CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              Qwen2Tokenizer)

    vocab = {f"Ġ{w}": i for i, w in enumerate(WORDS)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    text = dict(TEXT, model_type="llama", num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=512,
                initializer_range=INIT_STD, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=None)
    vision = dict(TEXT, model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.image_token_id,
                         vision_feature_layer=-1)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # 32 px / 8 px patches = 16 image tokens; CLIP's class token is the additional one, dropped by "default".
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return LlavaForConditionalGeneration(config), processor


def make_tiny_vlm(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `kind` checkpoint (weights, config, processor) to `folder`."""
    import torch

    builders = {"florence2": _florence2, "blip": _blip, "llava": _llava}
    if kind not in builders:
        raise ValueError(f"unknown tiny captioner {kind!r}; choose one of {', '.join(KINDS)}")
    torch.manual_seed(seed)
    model, processor = builders[kind]()
    # A random model may end at once or say only special tokens (an empty caption once decoded); a
    # trained captioner does neither, so these are kept from it. BLIP's generate uses its text
    # decoder's own settings, but its random decoder writes words anyway.
    tok = processor.tokenizer
    model.generation_config.min_new_tokens = 2
    model.generation_config.suppress_tokens = [i for i in tok.all_special_ids if i != tok.eos_token_id]
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote tiny {args.kind} captioner to {make_tiny_vlm(args.kind, args.dir, args.seed)}")


if __name__ == "__main__":
    main()
