"""support/llamagen.py on random weights: the published checkpoint layout, encode/decode shapes, the cosine lookup, and
load_llamagen's round trip and its one-line errors."""

import argparse
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support.llamagen import LLAMAGEN_CONFIGS, LlamaGenVQ, VectorQuantizer, load_llamagen

NAMES = list(LLAMAGEN_CONFIGS)


class CallsAFunction:
    """Unpickles by calling os.getcwd: harmless, but a pickle that runs code must be refused, not executed."""

    def __reduce__(self):
        return os.getcwd, ()

PUBLISHED_PARAMS = {"llamagen-vq16": 72e6, "llamagen-vq8": 70e6}  # LlamaGen README's table, rounded to 1M
EXPECTED_GRID = {"llamagen-vq16": 4, "llamagen-vq8": 8}  # code grid side for a 64 x 64 image


@pytest.fixture(scope="module")
def models():
    """One randomly initialised tokenizer per config, built once for the whole module."""
    torch.manual_seed(0)
    return {name: LlamaGenVQ(**cfg).eval().requires_grad_(False) for name, cfg in LLAMAGEN_CONFIGS.items()}


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 3, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def vq16_ckpt(models, tmp_path_factory):
    """A random-weights checkpoint of llamagen-vq16 in the published layout, written once."""
    path = tmp_path_factory.mktemp("ckpt") / "vq_ds16_c2i.pt"
    torch.save({"model": models["llamagen-vq16"].state_dict()}, path)
    return path


# ---- The published checkpoints' layout, written from LlamaGen's tokenizer/tokenizer_image/vq_model.py ----
# VQ_16 and VQ_8 there are VQModel(ModelArgs(encoder_ch_mult=decoder_ch_mult=...)) with ch 128, 2 res blocks a
# level, z_channels 256 and a 16384 x 8 codebook; `codebook_show_usage` registers quantize.codebook_used, 65536
# floats. vq_ds16_c2i.pt and vq_ds8_c2i.pt hold VQModel.state_dict() under "model".

PUBLISHED_CH_MULT = {"llamagen-vq16": [1, 1, 2, 2, 4], "llamagen-vq8": [1, 2, 2, 4]}


def published_shapes(name):
    """{key: shape} of VQModel.state_dict() for VQ_16 or VQ_8, key by key as vq_model.py creates them."""
    ch_mult, ch, z_channels, n_e, e_dim, num_res_blocks = PUBLISHED_CH_MULT[name], 128, 256, 16384, 8, 2
    last = len(ch_mult) - 1
    shapes = {}

    def conv2d(prefix, c_in, c_out, kernel):  # nn.Conv2d(c_in, c_out, kernel): weight and bias
        shapes[prefix + ".weight"] = (c_out, c_in, kernel, kernel)
        shapes[prefix + ".bias"] = (c_out,)

    def normalize(prefix, c):  # Normalize(c): nn.GroupNorm(32, c, affine=True)
        shapes[prefix + ".weight"] = (c,)
        shapes[prefix + ".bias"] = (c,)

    def resnet_block(prefix, c_in, c_out):  # ResnetBlock(c_in, c_out), conv_shortcut=False
        normalize(prefix + ".norm1", c_in)
        conv2d(prefix + ".conv1", c_in, c_out, 3)
        normalize(prefix + ".norm2", c_out)
        conv2d(prefix + ".conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv2d(prefix + ".nin_shortcut", c_in, c_out, 1)

    def attn_block(prefix, c):  # AttnBlock(c)
        normalize(prefix + ".norm", c)
        conv2d(prefix + ".q", c, c, 1)
        conv2d(prefix + ".k", c, c, 1)
        conv2d(prefix + ".v", c, c, 1)
        conv2d(prefix + ".proj_out", c, c, 1)

    # Encoder: in_ch_mult = (1,) + ch_mult; attention at the last level only; a Downsample conv on every other
    conv2d("encoder.conv_in", 3, ch, 3)
    in_ch_mult = [1] + ch_mult
    for i_level in range(len(ch_mult)):
        block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
        for i_block in range(num_res_blocks):
            resnet_block(f"encoder.conv_blocks.{i_level}.res.{i_block}", block_in, block_out)
            block_in = block_out
            if i_level == last:
                attn_block(f"encoder.conv_blocks.{i_level}.attn.{i_block}", block_in)
        if i_level != last:
            conv2d(f"encoder.conv_blocks.{i_level}.downsample.conv", block_in, block_in, 3)
    resnet_block("encoder.mid.0", block_in, block_in)
    attn_block("encoder.mid.1", block_in)
    resnet_block("encoder.mid.2", block_in, block_in)
    normalize("encoder.norm_out", block_in)
    conv2d("encoder.conv_out", block_in, z_channels, 3)

    # Decoder: conv_blocks appended for i_level = last, ..., 0, so conv_blocks.0 is the lowest resolution;
    # num_res_blocks + 1 res blocks a level, attention where i_level == last, an Upsample conv where i_level != 0
    block_in = ch * ch_mult[last]
    conv2d("decoder.conv_in", z_channels, block_in, 3)
    resnet_block("decoder.mid.0", block_in, block_in)
    attn_block("decoder.mid.1", block_in)
    resnet_block("decoder.mid.2", block_in, block_in)
    for position, i_level in enumerate(reversed(range(len(ch_mult)))):
        block_out = ch * ch_mult[i_level]
        for i_block in range(num_res_blocks + 1):
            resnet_block(f"decoder.conv_blocks.{position}.res.{i_block}", block_in, block_out)
            block_in = block_out
            if i_level == last:
                attn_block(f"decoder.conv_blocks.{position}.attn.{i_block}", block_in)
        if i_level != 0:
            conv2d(f"decoder.conv_blocks.{position}.upsample.conv", block_in, block_in, 3)
    normalize("decoder.norm_out", block_in)
    conv2d("decoder.conv_out", block_in, 3, 3)

    # VectorQuantizer(n_e, e_dim, ...) and the 1 x 1 convs of VQModel
    shapes["quantize.embedding.weight"] = (n_e, e_dim)
    shapes["quantize.codebook_used"] = (65536,)
    conv2d("quant_conv", z_channels, e_dim, 1)
    conv2d("post_quant_conv", e_dim, z_channels, 1)
    return shapes


# ---- Architecture against the published checkpoint's layout ----------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_published_layout(name):
    with torch.device("meta"):
        model = LlamaGenVQ(**LLAMAGEN_CONFIGS[name])
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = published_shapes(name)
    assert found.keys() == expected.keys(), (sorted(found.keys() - expected.keys())[:5],
                                             sorted(expected.keys() - found.keys())[:5])
    assert found == expected
    assert len(expected) == {"llamagen-vq16": 344, "llamagen-vq8": 300}[name]
    assert model.downsample == {"llamagen-vq16": 16, "llamagen-vq8": 8}[name]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_published_table(name):
    with torch.device("meta"):
        model = LlamaGenVQ(**LLAMAGEN_CONFIGS[name])
    table = sum(math.prod(s) for k, s in published_shapes(name).items() if k != "quantize.codebook_used")
    count = sum(p.numel() for p in model.parameters())
    assert count == table  # 71,883,403 for VQ-16, 70,109,835 for VQ-8
    assert abs(count - PUBLISHED_PARAMS[name]) < 0.05 * PUBLISHED_PARAMS[name]


# ---- Encode, decode and the lookup -----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_shapes_and_range(models, images, name):
    model, side = models[name], EXPECTED_GRID[name]
    codes = model.encode(images)
    assert codes.shape == (2, side, side) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 16384
    assert torch.equal(model.encode(images), codes)  # deterministic
    decoded = model.decode(codes)
    assert decoded.shape == (2, 3, 64, 64)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert torch.equal(model.quantize.lookup(model.codebook[codes]), codes)  # an exact code maps back to itself


@pytest.mark.parametrize("name", NAMES)
def test_encode_is_nearest_code_by_cosine(models, images, name):
    model = models[name]
    z = model.quant_conv(model.encoder(images)).permute(0, 2, 3, 1).double()  # (B, h, w, d)
    E = model.quantize.embedding.weight.double()
    cosine = F.normalize(z, dim=-1) @ F.normalize(E, dim=-1).T  # (B, h, w, K)
    assert torch.equal(model.encode(images), cosine.argmax(-1))


def test_codebook_is_normalised_and_lookup_is_scale_invariant(models):
    model = models["llamagen-vq16"]
    E = model.codebook
    assert E.shape == (16384, 8)
    assert torch.allclose(E.norm(dim=1), torch.ones(16384), atol=1e-5)
    idx = torch.tensor([0, 5, 1234, 16383])
    for scale in (1e-3, 1.0, 7.0, 1e3):
        assert torch.equal(model.quantize.lookup(scale * E[idx]), idx)
        raw = model.quantize.embedding.weight[idx] * scale  # unnormalised codes find themselves too
        assert torch.equal(model.quantize.lookup(raw), idx)
    z = torch.randn(3, 5, 8)
    assert torch.equal(model.quantize.lookup(z), model.quantize.lookup(100 * z))
    # an input between two codes goes to the one it leans towards
    a, b = E[10], E[20]
    assert model.quantize.lookup(0.9 * a + 0.1 * b).item() == 10


def test_near_ties_round_as_llamagen_computes_the_distance():
    # Every value below is exact in float32, normalised or not: e'_0 = (1/2, 1/2, 1/2, 1/2, 0, 0, 0, 0), e'_1 = the
    # first axis, z' = z = (2^-26, 0, 0, 0, 1, 0, 0, 0). Its cosines are 2^-27 and 2^-26, so e'_1 is nearer (squared
    # distances 2 - 2^-26 and 2 - 2^-25); both are within half a float32 step (2^-24) of 2, so LlamaGen's
    # ||z'||^2 + ||e'_k||^2 - 2 <z', e'_k> rounds both to 2 and argmin takes the first, e'_0.
    weight = torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0, 0]])
    z = torch.tensor([[2.0 ** -26, 0, 0, 0, 1, 0, 0, 0]])
    z_flattened, embedding = F.normalize(z, p=2, dim=-1), F.normalize(weight, p=2, dim=-1)
    upstream = (torch.sum(z_flattened ** 2, dim=1, keepdim=True) + torch.sum(embedding ** 2, dim=1) - 2 *
                torch.einsum("bd,dn->bn", z_flattened, embedding.T)).argmin(dim=1)  # vq_model.py, in float32
    cosine = (z_flattened @ embedding.T).argmax(dim=1)
    assert upstream.tolist() == [0] and cosine.tolist() == [1]
    quantizer = VectorQuantizer(2, 8)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(weight)
    assert quantizer.lookup(z).tolist() == [0]


def test_bad_shapes_are_refused(models):
    model = models["llamagen-vq16"]
    with pytest.raises(ValueError, match="multiple of 16"):
        model.encode(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode(torch.zeros(4, 4, dtype=torch.long))


# ---- load_llamagen ---------------------------------------------------------------------------------------

def test_load_round_trips_to_identical_outputs(models, images, vq16_ckpt):
    source = models["llamagen-vq16"]
    loaded = load_llamagen("llamagen-vq16", str(vq16_ckpt))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    codes = loaded.encode(images)
    assert torch.equal(codes, source.encode(images))
    assert torch.equal(loaded.decode(codes), source.decode(codes))
    assert torch.equal(loaded.codebook, source.codebook)


def test_load_accepts_a_bare_state_dict_and_training_extras(models, images, tmp_path):
    model = models["llamagen-vq8"]
    state = model.state_dict()
    bare, full = tmp_path / "bare.pt", tmp_path / "full.pt"
    torch.save(state, bare)
    torch.save({"model": state, "steps": 10, "args": argparse.Namespace(vq_model="VQ-8", lr=1e-4)}, full)
    for path in (bare, full):
        assert torch.equal(load_llamagen("llamagen-vq8", str(path)).encode(images), model.encode(images))


def test_load_errors_name_the_path(models, vq16_ckpt, tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such file.*vq_ds16_c2i.pt"):
        load_llamagen("llamagen-vq16", str(missing))

    junk = tmp_path / "junk.pt"
    junk.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=f"{junk}: not a readable PyTorch file"):
        load_llamagen("llamagen-vq16", str(junk))

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(vq16_ckpt.read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match=f"{truncated}: not a readable PyTorch file"):
        load_llamagen("llamagen-vq16", str(truncated))

    code = tmp_path / "code.pt"
    torch.save({"model": models["llamagen-vq16"].state_dict(), "hook": CallsAFunction()}, code)
    with pytest.raises(ValueError, match=f"{code}: not a readable PyTorch file"):
        load_llamagen("llamagen-vq16", str(code))

    vq8 = tmp_path / "vq_ds8_c2i.pt"
    torch.save({"model": models["llamagen-vq8"].state_dict()}, vq8)
    with pytest.raises(ValueError, match=f"{vq8}: this is a llamagen-vq8 checkpoint, not llamagen-vq16"):
        load_llamagen("llamagen-vq16", str(vq8))

    state = dict(models["llamagen-vq16"].state_dict())
    del state["decoder.conv_blocks.0.attn.2.q.weight"]
    one_short = tmp_path / "one_short.pt"
    torch.save({"model": state}, one_short)
    with pytest.raises(ValueError, match=f"{one_short}: .*missing keys decoder.conv_blocks.0.attn.2.q.weight"):
        load_llamagen("llamagen-vq16", str(one_short))

    state = dict(models["llamagen-vq16"].state_dict())
    state["quantize.embedding.weight"] = torch.zeros(16384, 4)
    wrong_shape = tmp_path / "wrong_shape.pt"
    torch.save({"model": state}, wrong_shape)
    with pytest.raises(ValueError, match=rf"{wrong_shape}: quantize.embedding.weight has shape \(16384, 4\), "
                                        rf"but llamagen-vq16 expects \(16384, 8\)"):
        load_llamagen("llamagen-vq16", str(wrong_shape))

    state = dict(models["llamagen-vq16"].state_dict(), extra_head=torch.zeros(1))
    extra = tmp_path / "extra.pt"
    torch.save(state, extra)
    with pytest.raises(ValueError, match=f"{extra}: .*unexpected keys extra_head"):
        load_llamagen("llamagen-vq16", str(extra))

    with pytest.raises(ValueError, match="unknown LlamaGen tokenizer 'vq-32'"):
        load_llamagen("vq-32", str(vq16_ckpt))


def test_error_messages_are_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError) as info:
        load_llamagen("llamagen-vq16", str(junk))
    assert "\n" not in str(info.value)


def test_a_file_of_another_kind_is_named(tmp_path):
    tokenizer = tmp_path / "tokenizer.pt"
    torch.save({"kind": "mnist-vq", "config": {}, "model": {"encoder.net.0.weight": torch.zeros(1)}}, tokenizer)
    with pytest.raises(ValueError, match=f"{tokenizer}: a checkpoint of kind 'mnist-vq'; expected LlamaGen's "
                                         f"vq_ds16_c2i.pt"):
        load_llamagen("llamagen-vq16", str(tokenizer))
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=f"{samples}: not a readable PyTorch file"):
        load_llamagen("llamagen-vq16", str(samples))
