"""The embedded text-conditioned ``fmnist-sd3``: prompts and their classes, the tokenizer, the training script's
pieces (prompt sampling, the zero-row shortcut, the text encoding) and a shipped pipeline's round trip, on tiny
random parts (the trained weights are not needed)."""
import math

import pytest
import torch
from conftest import load_script

from cqpolicy.models import fmnist_sd3

TINY = dict(fmnist_sd3.TRANSFORMER_CONFIG, num_layers=2)


def test_prompt_i_names_class_i_mod_10_and_a_prompt_names_the_class_it_says():
    for templates in (fmnist_sd3.TRAIN_TEMPLATES, fmnist_sd3.HELD_OUT_TEMPLATES):
        texts = fmnist_sd3.prompts(templates)
        assert [fmnist_sd3.prompt_class(t) for t in texts] == [i % 10 for i in range(len(texts))]
    assert fmnist_sd3.prompt_class("a photo of a T-Shirt!") == 0
    assert fmnist_sd3.prompt_class("a white shirt") == 6
    assert fmnist_sd3.prompt_class("ankle boot, product shot") == 9
    assert fmnist_sd3.prompt_class("a bag and a coat") is None  # two classes
    assert fmnist_sd3.prompt_class("a lighthouse") is None
    assert not set(fmnist_sd3.TRAIN_TEMPLATES) & set(fmnist_sd3.HELD_OUT_TEMPLATES)


def test_the_tokenizer_spells_every_prompt_word_as_one_token_and_never_fails_on_other_text(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = fmnist_sd3.build_tokenizer()
    ids = tokenizer("a catalog image of one ankle boot").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "catalog</w>", "image</w>", "of</w>",
                                                    "one</w>", "ankle</w>", "boot</w>", "<|endoftext|>"]
    unknown = tokenizer("zebra 🦓 ünïcode", padding="max_length", max_length=fmnist_sd3.MAX_TOKENS,
                        truncation=True).input_ids
    assert len(unknown) == fmnist_sd3.MAX_TOKENS and tokenizer.unk_token_id not in unknown[1:6]  # byte pieces
    assert tokenizer("").input_ids == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    tokenizer.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)("a photo of a sneaker").input_ids == \
        tokenizer("a photo of a sneaker").input_ids


def test_training_prompts_name_their_class_some_are_empty_and_none_is_a_held_out_template():
    script = load_script("train_fmnist_sd3")
    labels = torch.arange(2000) % 10
    texts = script.training_prompts(labels, torch.Generator().manual_seed(0))
    empty = [t == "" for t in texts]
    assert 0.07 < sum(empty) / len(texts) < 0.13  # PROMPT_DROPOUT = 0.1
    assert all(fmnist_sd3.prompt_class(t) == int(y) for t, y, e in zip(texts, labels, empty) if not e)
    held_out = set(fmnist_sd3.prompts(fmnist_sd3.HELD_OUT_TEMPLATES))
    assert not held_out & set(texts)
    n = script.zero_rows(4000, torch.Generator().manual_seed(0))
    assert 0.45 < float((n == 0).float().mean()) < 0.55 and int(n.max()) == script.ZERO_ROWS


@pytest.mark.parametrize("rows", [0, 7, 256])
def test_one_zero_row_with_a_log_n_bias_is_n_zero_rows(rows):
    """The training shortcut gives the model output of the pipeline's n appended zero rows (up to float error)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    script = load_script("train_fmnist_sd3")
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, hidden, pooled = torch.randn(2, 4, 14, 14), torch.randn(2, 16, 128), torch.randn(2, 128)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        reference = model(hidden_states=x, encoder_hidden_states=torch.cat([hidden, hidden.new_zeros(2, rows, 128)], 1),
                          pooled_projections=pooled, timestep=t).sample
        model.set_attn_processor(script.ZeroRowsAttnProcessor())
        bias = torch.zeros(2, 1, 1, 49 + 17)
        bias[..., -1] = math.log(rows) if rows else -math.inf
        shortcut = model(hidden_states=x, encoder_hidden_states=torch.cat([hidden, hidden.new_zeros(2, 1, 128)], 1),
                         pooled_projections=pooled, timestep=t, joint_attention_kwargs={"attention_mask": bias}).sample
        model.set_attn_processor(JointAttnProcessor2_0())
    assert torch.allclose(shortcut, reference, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_pipeline():
    torch.manual_seed(0)
    tokenizer = fmnist_sd3.build_tokenizer()
    from diffusers import SD3Transformer2DModel

    return fmnist_sd3.build_pipeline(SD3Transformer2DModel(**TINY), fmnist_sd3.build_vae(), tokenizer,
                                     fmnist_sd3.build_text_encoder(tokenizer), fmnist_sd3.build_text_encoder(tokenizer))


def test_the_training_encoding_is_the_pipelines_without_zero_rows(tiny_pipeline):
    script = load_script("train_fmnist_sd3")
    texts = ["a photo of a sneaker", ""]
    ids = tiny_pipeline.tokenizer(texts, padding="max_length", max_length=fmnist_sd3.MAX_TOKENS, truncation=True,
                                  return_tensors="pt").input_ids
    with torch.no_grad():
        hidden, pooled = script.encode((tiny_pipeline.text_encoder, tiny_pipeline.text_encoder_2), ids)
        embeds, _, pipe_pooled, _ = tiny_pipeline.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                                                max_sequence_length=0)
    assert torch.equal(hidden, embeds) and torch.equal(pooled, pipe_pooled)


def test_a_shipped_pipeline_folder_loads_samples_and_is_scored_by_class(tiny_pipeline, tmp_path):
    from cqpolicy.evaluation.evaluate import default_labels, is_fashion_mnist_like, sample_classes
    from cqpolicy.models import load_model
    from cqpolicy.sampling import SampleSettings, sample

    tiny_pipeline.save_pretrained(tmp_path)
    texts = fmnist_sd3.prompts(fmnist_sd3.HELD_OUT_TEMPLATES)
    model = load_model(str(tmp_path), prompts=texts)
    assert model.image_shape == (1, 28, 28) and is_fashion_mnist_like(model)
    assert model.prompts.rows["encoder_hidden_states"].shape[1] == 16 + 256  # the pipeline's default zero rows
    model.extra["prompt_options"] = dict(fmnist_sd3.PROMPT_OPTIONS)  # what the embedded model samples with
    model.use_prompts(texts)
    assert model.prompts.rows["encoder_hidden_states"].shape[1] == 16
    labels = default_labels(12, model.num_classes)
    assert sample_classes(model, labels).tolist() == [i % 10 for i in range(12)]
    images = sample(model, labels[:2], [0, 1], SampleSettings(steps=2, scheduler="flow", guidance_scale=3.0),
                    progress=False)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    model.use_prompts(["a lighthouse"])
    assert not is_fashion_mnist_like(model)  # no class to score against


def test_without_a_checkpoint_the_flow_phase_starts_from_the_shipped_weights_at_their_step(tmp_path):
    """A later session that lost the checkpoint folder resumes from what ships (weights and training.json)."""
    import json
    from types import SimpleNamespace

    script = load_script("train_fmnist_sd3")
    tokenizer = fmnist_sd3.build_tokenizer()

    def parts():
        return torch.nn.ModuleDict({"transformer": fmnist_sd3.build_denoiser(),
                                    "text_encoder": fmnist_sd3.build_text_encoder(tokenizer),
                                    "text_encoder_2": fmnist_sd3.build_text_encoder(tokenizer)})

    torch.manual_seed(1)
    trained = parts()
    script.export(trained, fmnist_sd3.build_vae(), tokenizer, tmp_path / "ship")
    (tmp_path / "ship" / script.PROGRESS).write_text(json.dumps({"step": 1200, "minutes": 30.0, "batch_size": 128}))
    fresh = SimpleNamespace(modules=parts(), ema=parts(), step=0, elapsed=0.0)
    script.resume_from_shipped(fresh, tmp_path / "ship")
    assert fresh.step == 1200 and fresh.elapsed == 1800.0
    for name in ("transformer", "text_encoder_2"):
        for mine, shipped in zip(fresh.modules[name].parameters(), trained[name].parameters()):
            assert torch.equal(mine, shipped.half().float())  # the fp16 it shipped in
        assert all(torch.equal(a, b) for a, b in zip(fresh.ema[name].parameters(), fresh.modules[name].parameters()))


def test_an_empty_prompt_is_the_unconditional_branch_and_unknown_words_encode(tiny_pipeline, tmp_path):
    from cqpolicy.models import load_model

    tiny_pipeline.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), prompts=["", "a zebra in ünïcode 🦓", "a photo of a bag"])
    for key, null in model.prompts.null.items():
        assert torch.equal(model.prompts.rows[key][0], null[0]), key
        assert torch.isfinite(model.prompts.rows[key]).all()


def test_the_shipped_prompt_files_are_the_templates():
    from pathlib import Path

    folder = Path(fmnist_sd3.__file__).parents[1] / "configs" / "prompts"
    for name, templates in (("train", fmnist_sd3.TRAIN_TEMPLATES), ("held-out", fmnist_sd3.HELD_OUT_TEMPLATES)):
        assert (folder / f"fmnist-sd3-{name}.txt").read_text().splitlines() == fmnist_sd3.prompts(templates)


def test_the_main_job_runs_a_flow_matching_model_with_its_own_scheduler(tiny_pipeline, tmp_path, request):
    """`cqpolicy run --quick` with the shipped fmnist-sd3 config on a tiny pipeline of its layout: every stage
    samples with flow matching (the model's scheduler), prompted by the training prompts."""
    import json
    from pathlib import Path

    import yaml

    from cqpolicy.cli import main

    tiny_pipeline.save_pretrained(tmp_path / "model")
    config = yaml.safe_load((Path(request.config.rootpath) / "configs/fmnist-sd3.yaml").read_text())
    config["model"] = str(tmp_path / "model")  # a diffusers folder: prompted by a file, here the packaged one
    config["prompts"] = str(Path(fmnist_sd3.__file__).parents[1] / "configs" / "prompts" / "fmnist-sd3-train.txt")
    config["quick"].update(steps=4, search={"n_trials": 2, "num_samples": 4, "batch_size": 4, "min_psnr": None})
    config["quick"]["bench"].update(num_samples=4, batch_size=4, repeats=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "run.yaml"), "--quick", "--out", str(out)]) == 0
    rows = json.loads((out / "bench" / "rows.json").read_text())
    assert {r["scheduler"] for r in rows} == {"flow"} and any(r["policy"] == "fora:interval=2" for r in rows)
    # FORA at a learned point's MACs is added once: `fora:interval=2` already runs the model's default units
    assert not any(r["policy"] == "fora:interval=2,unit=attn+ff+ff_context" for r in rows)
    manifest = json.loads((out / "traces" / "none" / "manifest.json").read_text())
    assert manifest["scheduler"] == "flow"


def test_the_shipped_model_samples_prompted_images_in_the_stock_pipeline_and_the_sampler():
    """The shipped weights, end to end: the sampler (its training prompts, its guidance) and the unmodified
    StableDiffusion3Pipeline under a cache policy."""
    from diffusers import StableDiffusion3Pipeline

    import cqpolicy
    from cqpolicy.models import load_model
    from cqpolicy.sampling import sample
    from cqpolicy.sampling.sampler import settings_for

    model = load_model("fmnist-sd3")
    assert model.default_guidance_scale == fmnist_sd3.DEFAULT_GUIDANCE_SCALE and len(model.prompts.texts) == 120
    images = sample(model, [7, 9], [0, 1], settings_for(model, steps=4, batch_size=2), progress=False)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    pipe = StableDiffusion3Pipeline.from_pretrained(fmnist_sd3.SHIPPED_DIR, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with cqpolicy.enable(pipe, "fora:interval=2") as handle:
        out = pipe(["a photo of a sneaker"], num_inference_steps=4, output_type="np").images
    assert out.shape == (1, 28, 28, 1) and handle.reuse_ratio == 0.5
