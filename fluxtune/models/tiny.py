"""Tiny, randomly initialised FLUX pipelines built in code, for offline tests and demos.

    from diffusers import Flux2KleinPipeline
    from fluxtune.models.tiny import make_tiny
    path = make_tiny("flux2-klein", "/tmp/tiny-klein")   # any of KINDS
    pipe = Flux2KleinPipeline.from_pretrained(path)       # runs offline, ~0.1 s for 2 steps at 64 px

or from a shell: ``python -m fluxtune.models.tiny flux1 /tmp/tiny-flux1``.

Each kind is a complete diffusers pipeline (transformer, VAE, text encoder(s), tokenizer(s),
scheduler) saved with ``save_pretrained`` in about 1-3 MB. Nothing is downloaded. The geometry of
the real checkpoints is kept where the trainer depends on it: VAE downsampling 8, FLUX.1
``in_channels=64`` (16 latent channels packed 2x2), FLUX.2 ``in_channels=128`` (32 patchified 2x2),
3-layer text encoders for FLUX.2 so ``text_encoder_out_layers=(1, 2, 3)`` stands in for the real
(10, 20, 30) / (9, 18, 27). Same seed, byte-identical files.
"""

import os
import pathlib
import string
import sys
from collections import Counter

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

KINDS = ("flux1", "flux1-schnell", "flux2", "flux2-klein")

# Whole-word tokens, so that short English captions map to distinct, word-like ids; anything else
# falls back to single characters (bytes), never to an unknown token.
WORDS = """
a an the of and with in on at to by from under over near behind next front top is are
photo picture image painting drawing render portrait closeup style sketch illustration
cat dog bird horse fish astronaut rocket coffee cup motorcycle bike car man woman person
child face house tree flower sky sea beach mountain city street road space moon sun star
table window chair book hat bag water snow grass forest field garden wall door light
red blue green yellow black white orange purple pink brown gray golden dark bright
big small old young happy cute sitting standing running flying riding wearing holding
""".split()

# Every width is a multiple of 64, as in the real checkpoints: bitsandbytes' CPU 4-bit kernel packs
# weights in blocks of 64 input features (32 outputs), so narrower layers would fail where the real
# ones never do (`fluxtune.models.quantize.NF4_BLOCK`).
TEXT_HIDDEN = 64  # every text encoder; FLUX.2 joint_attention_dim = 3 * TEXT_HIDDEN
FLUX2_TEXT_LAYERS = 3


def _padded(vocab: int) -> int:
    """Embedding rows for a vocabulary, rounded up to 64 as real checkpoints pad theirs."""
    return -(-vocab // 64) * 64


# --- tokenizers -------------------------------------------------------------------------------


def _learn_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Plain BPE training: fuse the most frequent adjacent pair until every word is one symbol.

    Done here rather than with ``tokenizers``' trainer, whose tie-breaking (and so the ids) varies
    between processes for CLIP's end-of-word alphabet.
    """
    words = [list(w) for w in words]
    merges = []
    while pairs := Counter(pair for w in words for pair in zip(w, w[1:])):
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [w[i] + w[i + 1]]
                i += 1
    return merges


def _bpe(
    specials: list[str], alphabet: list[str], words: list[list[str]]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (specials, alphabet, then merged pieces) and merges that spell every word as one token."""
    merges = _learn_merges(words)
    pieces = dict.fromkeys([*specials, *alphabet, *(a + b for a, b in merges)])
    return {piece: i for i, piece in enumerate(pieces)}, merges


# Byte-level BPE maps raw bytes to 256 printable characters; a leading space becomes "\u0120" (Ġ).
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())


def _byte_level_bpe(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Mistral's tekken / Qwen's style: each word both at the start of a text and after a space."""
    return _bpe(specials, BYTES, [list(prefix + w) for w in WORDS for prefix in ("", "\u0120")])


def _clip_tokenizer() -> CLIPTokenizer:
    # CLIP marks the last symbol of a word with "</w>"; unknown characters can never occur.
    alphabet = BYTES + [b + "</w>" for b in BYTES]
    words = [[*w[:-1], w[-1] + "</w>"] for w in WORDS]
    vocab, merges = _bpe(["<|startoftext|>", "<|endoftext|>"], alphabet, words)
    # FluxPipeline pads CLIP prompts to model_max_length, whose default is effectively infinite.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    # Unigram scores: a whole word beats spelling it out character by character.
    chars = "▁" + string.ascii_letters + string.digits + string.punctuation
    vocab = [
        *((special, 0.0) for special in ("<pad>", "</s>", "<unk>")),
        *((c, -5.0) for c in chars),
        *((f"▁{w}", -1.0) for w in WORDS),
    ]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


# Mistral Small 3.x layout; the pipeline passes content as a list of {"type": "text"} parts.
MISTRAL_CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
{%- if message['content'] is string -%}{%- set text = message['content'] -%}
{%- else -%}
{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
{%- endif -%}
{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}
{%- elif message['role'] == 'user' -%}{{ '[INST]' + text + '[/INST]' }}
{%- else -%}{{ text + eos_token }}
{%- endif -%}
{%- endfor -%}"""

# Qwen3's ChatML layout, including the empty think block it emits for enable_thinking=False.
QWEN3_CHAT_TEMPLATE = r"""{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}
{%- endif -%}"""


def _mistral_tokenizer() -> PreTrainedTokenizerFast:
    # Stands in for FLUX.2-dev's PixtralProcessor, of which the pipeline only uses apply_chat_template.
    specials = "<unk> <s> </s> [INST] [/INST] [SYSTEM_PROMPT] [/SYSTEM_PROMPT] [IMG] <pad>".split()
    vocab, merges = _byte_level_bpe(specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=512,
    )


def _qwen_tokenizer() -> Qwen2Tokenizer:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab, merges = _byte_level_bpe(specials)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=specials[1:],
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=512,
    )


# --- models -----------------------------------------------------------------------------------


def _vae_kwargs(latent_channels: int) -> dict:
    # Four blocks keep the real downsampling factor of 8; the channel counts are what shrinks.
    return dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
    )


def _scheduler(dynamic_shifting: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev / FLUX.2's resolution-dependent shift; FLUX.1-schnell's is off (shift 1.0)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dynamic_shifting else 1.0,
        use_dynamic_shifting=dynamic_shifting,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


_BLOCKS = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)


def _flux1(guidance: bool) -> FluxPipeline:
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=_padded(len(clip_tok)),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TEXT_HIDDEN,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=_padded(len(t5_tok)),
            d_model=TEXT_HIDDEN,
            d_kv=32,
            d_ff=128,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as in FLUX.1's t5-v1_1-xxl
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
        )
    )
    return FluxPipeline(
        # schnell (no guidance embedder) ships a fixed-shift scheduler, dev a dynamic one.
        scheduler=_scheduler(dynamic_shifting=guidance),
        vae=AutoencoderKL(
            **_vae_kwargs(16),
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=FluxTransformer2DModel(
            in_channels=64,
            **_BLOCKS,
            joint_attention_dim=TEXT_HIDDEN,
            pooled_projection_dim=TEXT_HIDDEN,
            guidance_embeds=guidance,
            axes_dims_rope=(8, 12, 12),
        ),
    )


def _flux2_vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(**_vae_kwargs(32))
    # Fresh BatchNorm stats are mean 0 / var 1, which would make latent normalisation a no-op.
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _flux2_transformer(guidance: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        in_channels=128,
        **_BLOCKS,
        joint_attention_dim=FLUX2_TEXT_LAYERS * TEXT_HIDDEN,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=guidance,
    )


def _decoder_kwargs(tokenizer) -> dict:
    """Config shared by the Mistral and Qwen3 text decoders: 3 layers, GQA like the real ones."""
    return dict(
        vocab_size=_padded(len(tokenizer)),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=FLUX2_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _flux2() -> Flux2Pipeline:
    tokenizer = _mistral_tokenizer()
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=MistralConfig(**_decoder_kwargs(tokenizer)),
            # Never run by the pipeline (no images), but part of the real checkpoint's layout.
            vision_config=PixtralVisionConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=64,
                patch_size=8,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        )
    )
    return Flux2Pipeline(
        scheduler=_scheduler(),
        vae=_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_flux2_transformer(guidance=True),
    )


def _flux2_klein() -> Flux2KleinPipeline:
    tokenizer = _qwen_tokenizer()
    return Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=_flux2_vae(),
        # Tied embeddings, like Qwen3-4B (klein 4B's encoder).
        text_encoder=Qwen3ForCausalLM(Qwen3Config(**_decoder_kwargs(tokenizer), tie_word_embeddings=True)),
        tokenizer=tokenizer,
        transformer=_flux2_transformer(guidance=False),
        is_distilled=False,
    )


_BUILDERS = {
    "flux1": lambda: _flux1(guidance=True),
    "flux1-schnell": lambda: _flux1(guidance=False),
    "flux2": _flux2,
    "flux2-klein": _flux2_klein,
}


def make_tiny(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny pipeline ``kind`` (one of KINDS), save it to ``out_dir`` and return that path."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {KINDS}")
    # The builders create their modules in a fixed order, so one seed fixes every weight.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = _BUILDERS[kind]()
    out = pathlib.Path(out_dir)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m fluxtune.models.tiny {{{','.join(KINDS)}}} OUT_DIR")
    print(make_tiny(sys.argv[1], sys.argv[2]))
