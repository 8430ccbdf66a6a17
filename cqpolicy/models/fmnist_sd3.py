"""The embedded ``fmnist-sd3`` model: a small text-conditioned, flow-matching transformer for Fashion-MNIST.

Stable Diffusion 3's diffusers classes, so ``StableDiffusion3Pipeline`` runs it unchanged: an
``SD3Transformer2DModel`` (MMDiT blocks: one joint attention over image and text tokens, then ``ff`` and
``ff_context``) on the 4x14x14 latents of a small ``AutoencoderKL``, two small CLIP text encoders
(``CLIPTextModelWithProjection``) behind a CLIP BPE tokenizer learnt from the training prompts' words, and
``FlowMatchEulerDiscreteScheduler``. Trained with rectified flow (``scripts/train_fmnist_sd3.py``) on prompts made of
the class names and ``TRAIN_TEMPLATES``; ``HELD_OUT_TEMPLATES`` are never trained on. An empty prompt is the
unconditional branch (``PROMPT_DROPOUT`` of the training prompts are empty).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

NAME = "fmnist-sd3"
NUM_CLASSES = 10
SHIPPED_DIR = Path(__file__).parent / "fmnist-sd3"
FOLDER = "transformer"  # the denoiser's folder in the diffusers pipeline layout
TRAIN_COMMAND = "scripts/train_fmnist_sd3.py --phase vae, then --phase flow"

# the words of each Fashion-MNIST class in a prompt (label order of the dataset)
CLASS_WORDS = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TRAIN_TEMPLATES = (
    "a photo of a {}", "a {}", "{}", "a picture of a {}", "{}, product shot", "a black and white photo of a {}",
    "a grayscale picture of a {}", "a low resolution photo of a {}", "a {} on a black background",
    "a close-up photo of a {}", "a centered photo of a single {}", "{}, studio photo",
)
# never trained on: known words in new orders, and words no training prompt holds ("catalog", "image", "one"; the
# tokenizer knows them, training inserts them only as filler words, see FILLER_RATE)
HELD_OUT_TEMPLATES = ("a photo of the {}", "{}, black and white product photo", "a catalog image of one {}",
                      "picture: {}")
MAX_TOKENS = 16  # CLIP's context (SD3's pipeline pads the missing T5 stream with as many zero tokens)
PROMPT_DROPOUT = 0.1  # training prompts replaced by "" (the unconditional branch of classifier-free guidance)
FILLER_RATE = 0.3  # training prompts that get one random non-class word of the vocabulary at a random place

VAE_CONFIG = dict(
    in_channels=1, out_channels=1, latent_channels=4, sample_size=28,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,  # 28 -> 14
    scaling_factor=1.0, shift_factor=0.0,  # SD3's latent normalisation; training sets both from the latents' stats
)
TEXT_ENCODER_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                           max_position_embeddings=MAX_TOKENS, projection_dim=64)
TRANSFORMER_CONFIG = dict(
    sample_size=14, patch_size=2, in_channels=4, out_channels=4,  # 7x7 = 49 image tokens
    num_layers=8, attention_head_dim=32, num_attention_heads=4,  # width 128
    joint_attention_dim=128, caption_projection_dim=128,  # the two encoders' hidden states side by side: 64 + 64
    pooled_projection_dim=128, pos_embed_max_size=7,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
DEFAULT_GUIDANCE_SCALE = 3.0  # the lowest FID of 2-6 on 500 selection samples (docs/results/fmnist-sd3/guidance.md)
# trained to ignore the zero rows SD3's pipeline appends for an absent T5 (any number, 256 by default): cqpolicy
# samples with none, 256 fewer tokens per call than the pipeline's default (pass the same to the pipeline)
PROMPT_OPTIONS = {"max_sequence_length": 0}


def prompts(templates=TRAIN_TEMPLATES) -> list[str]:
    """Every template with every class, template by template: prompt ``i`` shows class ``i % 10``."""
    return [template.format(word) for template in templates for word in CLASS_WORDS]


def prompt_class(text: str) -> int | None:
    """The class a prompt names, None where it names none or several ("t-shirt" is read before "shirt")."""
    rest = f" {' '.join(re.findall('[a-z]+', text.lower()))} "
    found = set()
    for c in sorted(range(NUM_CLASSES), key=lambda c: -len(re.findall("[a-z]+", CLASS_WORDS[c]))):
        words = f" {' '.join(re.findall('[a-z]+', CLASS_WORDS[c]))} "
        if words in rest:
            found.add(c)
            rest = rest.replace(words, " | ")
    return found.pop() if len(found) == 1 else None


def build_tokenizer():
    """A CLIP tokenizer (byte-level BPE, CLIP's pre-tokenisation) whose merges spell every word of the training and
    held-out prompts as one token; any other text is split into known pieces, down to single bytes: never an
    error."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    words = Counter()  # CLIP's pre-tokenisation: letters, single digits, runs of other characters
    for text in prompts(TRAIN_TEMPLATES + HELD_OUT_TEMPLATES):
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
            words["".join(byte_char[b] for b in word.encode())] += 1
    # each word as symbols, the last carrying the end-of-word mark; merge the most frequent pair until all are one
    spelled = {w: (*w[:-1], w[-1] + "</w>") for w in words}
    merges = []
    while any(len(s) > 1 for s in spelled.values()):
        pairs = Counter()
        for w, symbols in spelled.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[w]
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, symbols in spelled.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            spelled[w] = tuple(out)
    tokens = list(byte_char.values()) + [c + "</w>" for c in byte_char.values()] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def filler_words() -> list[str]:
    """The words of the prompts that name no class: what training inserts (``FILLER_RATE``)."""
    words = {w for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES for w in re.findall("[a-z]+", t)}
    return sorted(words - {w for c in CLASS_WORDS for w in re.findall("[a-z]+", c)})


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **TEXT_ENCODER_CONFIG)
    return CLIPTextModelWithProjection(config)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_denoiser():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def build_pipeline(transformer, vae, tokenizer, text_encoder, text_encoder_2, scheduler=None):
    """The stock ``StableDiffusion3Pipeline`` around these parts (no T5: SD3's pipeline pads with zeros)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler or build_scheduler(),
                                    tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_3=None, text_encoder_3=None)
