"""Weight quantization (``cqpolicy.quantization``): codecs, honest sizes, calibrated allocation, the saved folder and
``cqpolicy quantize``, on tiny random models of both families."""
import json

import numpy as np
import pytest
import torch
from conftest import save_with_scheduler, tiny_fmnist_dit, tiny_unet

from cqpolicy.cli import main
from cqpolicy.models import ModelLoadError, load_model
from cqpolicy.quantization import (allocate_bits, encode, huffman_decode, huffman_encode, huffman_lengths,
                                   quantize_model, save_quantized)
from cqpolicy.quantization.storage import META_FILE, QUANTIZED_FILE

FAST = dict(calib_samples=2, calib_steps=3)


def _inputs(model, n=4):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, *model.latent_shape, generator=g)
    return x, torch.tensor([10, 300, 600, 900])[:n], torch.arange(n) % 10


@torch.no_grad()
def _out(model, inputs):
    return model.adapter.denoise(model.transformer, *inputs)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_int8_per_channel_error_is_within_half_a_scale():
    w = torch.randn(24, 10, 3, 3) * torch.logspace(-3, 0, 24)[:, None, None, None]  # channels of very different range
    code = encode(w, "uniform", 8)
    scales = code.tensors["scales"].float()
    assert scales.shape == (24, 1) and code.tensors["scales"].dtype == torch.float16
    assert ((w - code.dequantize()).abs().reshape(24, -1) <= scales / 2).all()


def test_int4_group_wise_error_bound_and_packing_halves_the_payload():
    w = torch.randn(32, 128)
    int8, int4 = encode(w, "uniform", 8, group_size=0), encode(w, "uniform", 4, group_size=0)
    assert int4.tensors["q"].numel() * 2 == int8.tensors["q"].numel() == w.numel()
    assert int4.tensors["q"].dtype == torch.uint8
    grouped = encode(w, "uniform", 4, group_size=64)
    scales = grouped.tensors["scales"].float()
    assert scales.shape == (32, 2) and grouped.nbytes == 32 * 128 // 2 + 32 * 2 * 2
    err = (w - grouped.dequantize()).abs().reshape(32, 2, 64)
    assert (err <= scales[..., None] / 2).all()
    assert encode(w, "uniform", 4, group_size=48).group_size == 128  # 48 does not divide 128: per channel
    for bits in (2, 3, 6):  # bit-packed widths rebuild to codes within range, at bits/8 bytes per weight
        code = encode(w, "uniform", bits, group_size=0)
        assert code.tensors["q"].numel() == -(-w.numel() * bits // 8)
        assert ((w - code.dequantize()).abs() <= code.tensors["scales"].float() / 2 + 1e-7).all()


def test_huffman_roundtrip_and_entropy_gain_on_a_peaked_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.7, 0.1, 0.08, 0.05, 0.03, 0.02, 0.015, 0.005]) + 0.0
    symbols = rng.choice(8, size=5001, p=p / p.sum())
    lengths = huffman_lengths(np.bincount(symbols, minlength=8))
    stream = huffman_encode(symbols, lengths)
    assert np.array_equal(huffman_decode(stream, lengths, len(symbols)), symbols)
    assert len(stream) * 8 <= len(symbols) * 3  # fixed width for 8 levels: 3 bits each
    with pytest.raises(ValueError):
        huffman_decode(stream[: len(stream) // 2], lengths, len(symbols))  # truncated stream
    skewed = huffman_lengths(np.array([2 ** i for i in range(40)]))
    assert skewed.max() <= 16  # length-limited, so the decoder table stays small


def test_acqe_code_counts_every_stored_byte_and_decodes_to_its_levels():
    w = torch.randn(64, 96) * 0.02
    w[:, :48] = 0.0  # peaked: many equal weights, which Huffman codes in fewer than `bits` bits
    code = encode(w, "acqe", 4)
    parts = code.tensors
    assert code.nbytes == parts["stream"].numel() + parts["lengths"].numel() + 2 * parts["centres"].numel()
    assert parts["centres"].dtype == torch.float16 and len(parts["centres"]) <= 16
    assert parts["stream"].numel() * 8 < w.numel() * 4
    dq = code.dequantize()
    assert set(dq.unique().tolist()) <= set(parts["centres"].float().tolist())
    assert _rel(dq, w) < 0.2


def test_allocation_meets_the_budget_and_favours_the_sensitive_layer():
    bits_of = {name: {b: 1000 * b for b in (2, 4, 8)} for name in ("a", "b")}
    errors = {"a": {2: 0.5, 4: 0.1, 8: 0.01}, "b": {2: 0.05, 4: 0.01, 8: 0.001}}
    params = {"a": 1000, "b": 1000}
    chosen = allocate_bits(bits_of, errors, params, budget_bits=5.0)
    assert sum(bits_of[n][b] for n, b in chosen.items()) <= 5.0 * 2000
    assert chosen["a"] > chosen["b"]
    with pytest.raises(ValueError, match="below what any allocation can meet"):
        allocate_bits(bits_of, errors, params, budget_bits=1.9)


@pytest.mark.parametrize("make, folder", [(tiny_fmnist_dit, "transformer"), (tiny_unet, "unet")])
def test_int8_model_is_close_to_fp32_and_reloads_identically(make, folder, tmp_path):
    root = save_with_scheduler(make(), tmp_path / "src", folder)
    reference, model = load_model(str(root)), load_model(str(root))
    inputs = _inputs(model)
    result = quantize_model(model, "int8")
    layers = [m for m in model.transformer.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert all(m.parametrizations.weight.original.numel() == 0 for m in layers)  # float weights really gone
    quantized = _out(model, inputs)
    assert _rel(quantized, _out(reference, inputs)) < 0.02

    report = save_quantized(model, result, tmp_path / "q")
    assert (tmp_path / "q" / folder / META_FILE).is_file() and (tmp_path / "q" / "scheduler").is_dir()
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "q" / folder / QUANTIZED_FILE))
    assert report["size_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert (tmp_path / "q" / folder / QUANTIZED_FILE).stat().st_size >= report["size_bytes"]
    assert json.loads((tmp_path / "q" / "report.json").read_text())["size_bytes"] == report["size_bytes"]
    assert 3.0 < report["compression_ratio"] < 4.0 and report["fp32_bytes"] == 2 * report["fp16_bytes"]
    assert all(layer["bits"] == 8 for layer in report["layers"].values())

    reloaded = load_model(str(tmp_path / "q"))
    assert torch.equal(_out(reloaded, inputs), quantized)


def test_int4_report_is_smaller_than_int8(tiny_dit_dir, tmp_path):
    sizes = {}
    for method in ("int8", "int4"):
        model = load_model(str(tiny_dit_dir))
        sizes[method] = save_quantized(model, quantize_model(model, method), tmp_path / method)
    assert sizes["int4"]["bits_per_weight"] < 5 < sizes["int8"]["bits_per_weight"] < 9
    assert sizes["int4"]["size_bytes"] < sizes["int8"]["size_bytes"]


@pytest.mark.parametrize("method", ["mixed", "acqe"])
def test_calibrated_methods_meet_the_budget_and_reload(method, tiny_unet_dir, tmp_path):
    model = load_model(str(tiny_unet_dir))
    inputs = _inputs(model)
    result = quantize_model(model, method, budget_bits=4.0, **FAST)
    report = save_quantized(model, result, tmp_path / "q")
    assert report["bits_per_weight"] <= 4.0
    assert len({layer["bits"] for layer in report["layers"].values()}) > 1  # really mixed
    sensitivity = report["calibration"]["sensitivity"]
    assert all(errs["2"] >= errs["8"] for errs in sensitivity.values())
    assert torch.equal(_out(load_model(str(tmp_path / "q")), inputs), _out(model, inputs))


def test_the_most_sensitive_layer_gets_more_bits(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    with torch.no_grad():  # make one layer dominate the output: quantizing it coarsely costs the most
        model.transformer.proj_out_2.weight.mul_(50.0)
    result = quantize_model(model, "mixed", budget_bits=3.0, group_size=0, **FAST)
    bits = {name: code.bits for name, code in result.layers.items()}
    assert sum(c.nbytes * 8 for c in result.layers.values()) <= 3.0 * sum(c.numel for c in result.layers.values())
    assert bits["proj_out_2"] == max(bits.values()) > min(bits.values())


def test_calibration_under_a_cache_policy_sees_other_inputs(tiny_dit_dir):
    from cqpolicy.quantization import calibration_inputs

    model = load_model(str(tiny_dit_dir))
    plain = calibration_inputs(model, 2, 6)
    cached = calibration_inputs(model, 2, 6, policy="fora:interval=3")
    assert len(plain) == len(cached) == 4
    assert torch.equal(plain[0][0], cached[0][0])  # same calibration noise
    assert not torch.equal(plain[-1][0], cached[-1][0])  # the cache schedule changed the trajectory


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / QUANTIZED_FILE).unlink(), "missing"),
    (lambda d: (d / QUANTIZED_FILE).write_bytes((d / QUANTIZED_FILE).read_bytes()[:-100]), "sha256"),
    (lambda d: (d / META_FILE).write_text("{not json"), "not valid JSON"),
    (lambda d: _edit_meta(d, lambda m: m["layers"][next(iter(m["layers"]))].update(shape=[3, 3])), "shape"),
    (lambda d: _edit_meta(d, lambda m: m.update(sha256="0" * 64)), "sha256"),
])
def test_a_damaged_folder_is_a_one_line_model_load_error(damage, message, tiny_dit_dir, tmp_path):
    model = load_model(str(tiny_dit_dir))
    save_quantized(model, quantize_model(model, "int4"), tmp_path / "q")
    damage(tmp_path / "q" / "transformer")
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(str(tmp_path / "q"))
    assert "\n" not in str(info.value)


def _edit_meta(folder, edit):
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_cli_quantize_writes_a_folder_the_sampler_loads(tiny_dit_dir, tmp_path, capsys):
    from cqpolicy.sampling import sample
    from cqpolicy.sampling.sampler import settings_for

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dit_dir), "--weights", "int4", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "bits per weight" in line
    model = load_model(str(out))
    images = sample(model, [0, 1], [5, 6], settings_for(model, steps=2), progress=False)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


def test_a_quantized_folder_samples_from_the_cli_and_costs_the_plain_models_macs(tiny_dit_dir, tmp_path):
    from cqpolicy.evaluation.cost import model_costs
    from cqpolicy.sampling import SampleSettings

    model = load_model(str(tiny_dit_dir))
    settings = SampleSettings(steps=2, guidance_scale=2.0)
    plain = model_costs(model, settings)
    save_quantized(model, quantize_model(model, "int8"), tmp_path / "q")
    quantized = model_costs(load_model(str(tmp_path / "q")), settings)
    assert quantized.row_macs == plain.row_macs and quantized.unit_macs == plain.unit_macs
    assert main(["sample", "--model", str(tmp_path / "q"), "--steps", "2", "--num-samples", "2",
                 "--out", str(tmp_path / "s")]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--weights", "int3"], "unsupported weight quantization"),
    (["--weights", "mixed", "--budget-bits", "1.5"], "below the smallest bit width"),
    (["--weights", "int4", "--group-size", "-8"], "--group-size"),
    (["--weights", "int8", "--budget-bits", "4"], "applies to mixed and acqe"),
    (["--weights", "mixed", "--calib-policy", "magic"], "unknown policy"),
])
def test_cli_bad_input_is_one_line_exit_2(extra, message, tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["quantize", "--model", str(tiny_dit_dir), "--out", str(out)] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


def test_cli_budget_no_allocation_meets_is_exit_2_and_a_full_out_is_kept(tiny_dit_dir, tmp_path, capsys):
    # 2 bits is a candidate width, but its scales push every allocation above 2.0 stored bits per weight
    code = main(["quantize", "--model", str(tiny_dit_dir), "--weights", "mixed", "--budget-bits", "2",
                 "--out", str(tmp_path / "q")])
    assert code == 2 and "below what any allocation can meet" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code = main(["quantize", "--model", str(tiny_dit_dir), "--weights", "int8", "--out", str(full)])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_the_folder_records_its_source_model_and_a_label_per_setting(tiny_dit_dir, tmp_path):
    from cqpolicy.models.fingerprint import model_fingerprint
    from cqpolicy.quantization import fp_weights_info, weights_info, weights_label

    source = model_fingerprint(load_model(str(tiny_dit_dir)))
    model = load_model(str(tiny_dit_dir))
    report = save_quantized(model, quantize_model(model, "int8"), tmp_path / "q")
    assert model_fingerprint(model) != source  # quantizing changed the weights: recorded before, not after
    meta = json.loads((tmp_path / "q" / "transformer" / META_FILE).read_text())
    assert meta["source_fingerprint"] == report["source_fingerprint"] == source
    assert meta["source_model"] == report["source_model"] == str(tiny_dit_dir)
    info = weights_info(tmp_path / "q", source)
    assert info["weights"] == "int8" and info["model_bytes"] == report["size_bytes"]
    with pytest.raises(ModelLoadError, match="was quantized from"):
        weights_info(tmp_path / "q", "0" * 16)
    _edit_meta(tmp_path / "q" / "transformer", lambda m: m.pop("source_fingerprint"))
    with pytest.raises(ModelLoadError, match="records no source model fingerprint"):
        weights_info(tmp_path / "q")
    fp = fp_weights_info(load_model(str(tiny_dit_dir)))
    assert fp["weights"] == "fp" and fp["compression_ratio"] == 1.0 and fp["model_bytes"] == report["fp32_bytes"]
    base = {"group_size": None, "budget_bits": None}
    assert weights_label({**base, "method": "int4", "group_size": 64}) == "int4"
    assert weights_label({**base, "method": "int4", "group_size": 0}) == "int4-g0"
    assert weights_label({**base, "method": "acqe", "budget_bits": 3.5}) == "acqe3.5"
    assert weights_label({"method": "mixed", "group_size": 64, "budget_bits": 4.0,
                          "calibration_policy": "fora:interval=3,warmup=2"}) == "mixed4@fora:interval=3;warmup=2"
