"""ldm_vq.py on random weights: the published vq-f8 layout, encode/decode shapes, the Euclidean lookup, load_ldm on
Lightning checkpoints (round trip, "loss." keys dropped, Lightning 1.x's callback class names) and its one-line
refusals, and `tokenizer.py encode --tokenizer ldm-vq8` through to sample.py."""

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
import tokenizer
import train
from support import codesets, datasets, tokenizers
from support.ldm_vq import LDM_CONFIGS, LdmVQ, VectorQuantizer, load_ldm

NAME = "ldm-vq8"


class Smuggled:
    """Any object but plain data: unpickling it means running code, so a checkpoint holding one is refused."""

    def __init__(self):
        self.payload = "anything"


class CallsAFunction:
    """Unpickles by calling os.getcwd: harmless, but a pickle that runs code must be refused, not executed."""

    def __reduce__(self):
        return os.getcwd, ()


# ---- The published checkpoint's layout -------------------------------------------------------------------
# Written from latent-diffusion's models/first_stage_models/vq-f8/config.yaml and taming's model.py / quantize.py
# (ldm/modules/diffusionmodules/model.py is the same code).
# VQModel(ddconfig, n_embed=16384, embed_dim=4): Encoder(**ddconfig), Decoder(**ddconfig), VectorQuantizer2
# (embedding 16384 x 4, remap None: no "used" buffer), quant_conv / post_quant_conv 1 x 1 between z_channels 4 and
# embed_dim 4. ddconfig: ch 128, ch_mult [1, 2, 2, 4], num_res_blocks 2, attn_resolutions [32], resolution 256,
# z_channels 4, double_z false, in_channels 3, out_ch 3. Attention goes where curr_res is in attn_resolutions:
# curr_res is 256, 128, 64, 32 over the encoder's levels and 32, 64, 128, 256 over the decoder's.

CH, CH_MULT, Z_CHANNELS, N_EMBED, EMBED_DIM, NUM_RES_BLOCKS = 128, [1, 2, 2, 4], 4, 16384, 4, 2
ATTN_LEVEL = 3  # the level at resolution 256 / 2**3 = 32


def published_shapes():
    """{key: shape} of VQModel.state_dict() without the loss, key by key as model.py and quantize.py create them."""
    shapes = {}

    def conv2d(prefix, c_in, c_out, kernel):  # torch.nn.Conv2d(c_in, c_out, kernel): weight and bias
        shapes[prefix + ".weight"] = (c_out, c_in, kernel, kernel)
        shapes[prefix + ".bias"] = (c_out,)

    def normalize(prefix, c):  # Normalize(c): GroupNorm(32, c, affine=True)
        shapes[prefix + ".weight"] = (c,)
        shapes[prefix + ".bias"] = (c,)

    def resnet_block(prefix, c_in, c_out):  # ResnetBlock(in_channels, out_channels, temb_channels=0): no temb_proj
        normalize(prefix + ".norm1", c_in)
        conv2d(prefix + ".conv1", c_in, c_out, 3)
        normalize(prefix + ".norm2", c_out)
        conv2d(prefix + ".conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv2d(prefix + ".nin_shortcut", c_in, c_out, 1)

    def attn_block(prefix, c):  # AttnBlock(c)
        normalize(prefix + ".norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv2d(f"{prefix}.{name}", c, c, 1)

    def mid(prefix, c):
        resnet_block(prefix + ".block_1", c, c)
        attn_block(prefix + ".attn_1", c)
        resnet_block(prefix + ".block_2", c, c)

    # Encoder: down.{i}.block / .attn / .downsample, in_ch_mult = (1,) + ch_mult, conv_out to z_channels (no double_z)
    conv2d("encoder.conv_in", 3, CH, 3)
    in_ch_mult = [1] + CH_MULT
    for i in range(4):
        block_in, block_out = CH * in_ch_mult[i], CH * CH_MULT[i]
        for j in range(NUM_RES_BLOCKS):
            resnet_block(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if i == ATTN_LEVEL:
                attn_block(f"encoder.down.{i}.attn.{j}", block_in)
        if i != 3:
            conv2d(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder.mid", block_in)
    normalize("encoder.norm_out", block_in)
    conv2d("encoder.conv_out", block_in, Z_CHANNELS, 3)

    # Decoder: built for i = 3, ..., 0 and prepended, so up.{i} is level i; num_res_blocks + 1 blocks a level
    block_in = CH * CH_MULT[3]
    conv2d("decoder.conv_in", Z_CHANNELS, block_in, 3)
    mid("decoder.mid", block_in)
    for i in (3, 2, 1, 0):
        block_out = CH * CH_MULT[i]
        for j in range(NUM_RES_BLOCKS + 1):
            resnet_block(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if i == ATTN_LEVEL:
                attn_block(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv2d(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    normalize("decoder.norm_out", block_in)
    conv2d("decoder.conv_out", block_in, 3, 3)

    shapes["quantize.embedding.weight"] = (N_EMBED, EMBED_DIM)
    conv2d("quant_conv", Z_CHANNELS, EMBED_DIM, 1)
    conv2d("post_quant_conv", EMBED_DIM, Z_CHANNELS, 1)
    return shapes


LOSS_KEYS = {"loss.logvar": (), "loss.discriminator.main.0.weight": (64, 3, 4, 4),
             "loss.perceptual_loss.scaling_layer.shift": (1, 3, 1, 1)}  # a few of VQLPIPSWithDiscriminator's


def shaped_only(shapes):
    """A state dict of the given shapes that costs nothing to write: every tensor is one zero, expanded."""
    return {k: torch.zeros(()).expand(s) for k, s in shapes.items()}


def lightning_checkpoint(state):
    """A PyTorch Lightning checkpoint around `state`: the loss's weights beside the tokenizer's, and plain extras."""
    return {"epoch": 12, "global_step": 971043, "pytorch-lightning_version": "1.4.2",
            "state_dict": {**state, **shaped_only(LOSS_KEYS)},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
            "lr_schedulers": [], "hyper_parameters": {"embed_dim": 4, "n_embed": 16384, "monitor": "val/rec_loss"}}


def fake_model_checkpoint(monkeypatch):
    """Lightning 1.x's ModelCheckpoint class, importable under its own name until `monkeypatch` is undone."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[name].ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": name})
    return sys.modules[name].ModelCheckpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LdmVQ(**LDM_CONFIGS[NAME]).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 3, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    """model's weights in a Lightning checkpoint, written once: TMP/model.ckpt."""
    path = tmp_path_factory.mktemp("vq-f8") / "model.ckpt"
    torch.save(lightning_checkpoint(model.state_dict()), path)
    return path


# ---- Architecture, encode, decode, the lookup ------------------------------------------------------------

def test_state_dict_matches_published_layout():
    with torch.device("meta"):
        meta_model = LdmVQ(**LDM_CONFIGS[NAME])
    found = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    expected = published_shapes()
    assert found.keys() == expected.keys(), (sorted(found.keys() - expected.keys())[:5],
                                             sorted(expected.keys() - found.keys())[:5])
    assert found == expected
    assert len(expected) == 299 and meta_model.downsample == 8


def test_encode_decode_shapes_at_256_px():
    with torch.device("meta"):  # shapes only: no weights, no arithmetic
        meta_model = LdmVQ(**LDM_CONFIGS[NAME])
        codes = meta_model.encode(torch.empty(2, 3, 256, 256))
        assert codes.shape == (2, 32, 32) and codes.dtype == torch.long
        assert meta_model.decode(codes).shape == (2, 3, 256, 256)
        assert meta_model.encode(torch.empty(1, 3, 256, 128)).shape == (1, 32, 16)


def test_encode_decode_on_random_weights(model, images):
    codes = model.encode(images)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 16384
    assert torch.equal(model.encode(images), codes)  # deterministic
    decoded = model.decode(codes)
    assert decoded.shape == (2, 3, 32, 48) and decoded.min() >= -1 and decoded.max() <= 1
    E = model.quantize.embedding.weight  # the decoder is fed the raw code vectors
    assert torch.equal(decoded, model.decoder(model.post_quant_conv(E[codes].permute(0, 3, 1, 2))).clamp(-1, 1))
    assert torch.equal(model.codebook, E) and model.codebook.shape == (16384, 4)
    assert torch.equal(model.quantize.lookup(model.codebook[codes]), codes)  # an exact code maps back to itself
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode(torch.zeros(1, 3, 36, 32))


def test_encode_is_nearest_code_by_euclidean_distance(model, images):
    z = model.quant_conv(model.encoder(images)).permute(0, 2, 3, 1).double()  # (B, h, w, d)
    E = model.quantize.embedding.weight.double()
    distances = (z[..., None, :] - E).pow(2).sum(-1)  # (B, h, w, K), brute force
    assert torch.equal(model.encode(images), distances.argmin(-1))
    cosine = F.normalize(z, dim=-1) @ F.normalize(E, dim=-1).T
    assert not torch.equal(distances.argmin(-1), cosine.argmax(-1))  # the test tells the two lookups apart


def test_the_nearest_code_is_not_the_best_aligned():
    quantizer = VectorQuantizer(3, 4)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [10.0, 1, 0, 0], [0, 0, 0, 0.5]]))
    z = torch.tensor([[1.0, 0.1, 0, 0], [9.0, 0, 0, 0], [0, 0, 0, 3.0]])  # cosine would pick 1, 1, 2
    assert quantizer.lookup(z).tolist() == [0, 1, 2]


def test_near_ties_round_as_latent_diffusion_computes_the_distance():
    # z_0 = (1, 0, 0, 0) has squared distances 1 + 2^-26 to e_0 and 1 + 2^-28 to e_1, both within half a float32
    # step (2^-24) of 1: VectorQuantizer2's ||z||^2 + ||e_k||^2 - 2 <z, e_k> rounds both to 1 and argmin takes the
    # first, e_0; without ||z||^2 they are 2^-26 and 2^-28, apart, and pick e_1. z_1 is nearest e_1 either way.
    E = torch.tensor([[0, 2.0 ** -13, 0, 0], [0, 0, 2.0 ** -14, 0]])
    z = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]])
    upstream = (torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(E ** 2, dim=1) - 2 *
                torch.einsum("bd,dn->bn", z, E.T)).argmin(dim=1)  # taming's quantize.py, in float32
    without_z = (torch.sum(E ** 2, dim=1) - 2 * z @ E.T).argmin(dim=1)
    assert upstream.tolist() == [0, 1] and without_z.tolist() == [1, 1]
    quantizer = VectorQuantizer(2, 4)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(E)
    assert quantizer.lookup(z.view(1, 2, 4)).tolist() == [[0, 1]]


# ---- load_ldm --------------------------------------------------------------------------------------------

def test_a_lightning_checkpoint_round_trips(model, images, ckpt):
    loaded = load_ldm(NAME, str(ckpt))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.state_dict().keys() == published_shapes().keys()  # the "loss." keys are gone
    codes = loaded.encode(images)
    assert torch.equal(codes, model.encode(images))
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert torch.equal(loaded.codebook, model.codebook)


def test_lightning_1x_callback_class_names_load_but_objects_do_not(tmp_path):
    """Lightning 1.x keys checkpoint["callbacks"] by the callback's class: that name loads, an instance does not."""
    named, built = tmp_path / "named.ckpt", tmp_path / "built.ckpt"
    checkpoint = lightning_checkpoint(shaped_only(published_shapes()))
    with pytest.MonkeyPatch.context() as monkeypatch:
        ModelCheckpoint = fake_model_checkpoint(monkeypatch)
        checkpoint["callbacks"] = {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.3),
                                                     "best_model_path": "logs/checkpoints/epoch=11.ckpt"}}
        torch.save(checkpoint, named)
        torch.save({**checkpoint, "callbacks": [ModelCheckpoint()]}, built)
    assert "pytorch_lightning" not in sys.modules  # the loader never imports Lightning
    assert load_ldm(NAME, str(named)).codebook.shape == (16384, 4)
    with pytest.raises(ValueError) as error:
        load_ldm(NAME, str(built))
    assert str(error.value).startswith(f"{built}: holds a pickled pytorch_lightning.callbacks.model_checkpoint."
                                       f"ModelCheckpoint, refused") and "\n" not in str(error.value)


@pytest.mark.parametrize("extra,refused", [(Smuggled(), "test_ldm_vq.Smuggled"), (CallsAFunction(), "getcwd")],
                         ids=["object", "function"])
def test_a_pickled_object_is_refused_in_one_line(tmp_path, extra, refused):
    path = tmp_path / "model.ckpt"
    torch.save({**lightning_checkpoint(shaped_only(published_shapes())), "extra": extra}, path)
    with pytest.raises(ValueError) as error:
        load_ldm(NAME, str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: holds a pickled ") and refused in message and "\n" not in message
    assert "refused (loading it could run code); expected latent-diffusion's vq-f8/model.ckpt" in message


WRONG_CHECKPOINTS = {
    "missing": "{path}: not an ldm-vq8 checkpoint: missing keys decoder.up.3.attn.2.q.weight",
    "shape": r"{path}: quantize.embedding.weight has shape \(16384, 8\), but ldm-vq8 expects \(16384, 4\)",
    "unexpected": "{path}: not an ldm-vq8 checkpoint: unexpected keys model_ema.decay",
    "no state dict": "{path}: expected a state dict of tensors under 'state_dict'",
    "llamagen": "{path}: expected a state dict of tensors under 'state_dict'",
    "kind": "{path}: a checkpoint of kind 'mnist-vq'; expected latent-diffusion's vq-f8/model.ckpt",
    "junk": "{path}: not a readable PyTorch file",
    "absent": r"{path}: no such file; expected latent-diffusion's vq-f8/model.ckpt \(unzipped from "
              r"https://ommer-lab.com/files/latent-diffusion/vq-f8.zip\)",
}


@pytest.mark.parametrize("change", list(WRONG_CHECKPOINTS))
def test_a_wrong_checkpoint_is_one_line_naming_it(tmp_path, change):
    path = tmp_path / "model.ckpt"
    state = shaped_only(published_shapes())
    if change == "missing":
        del state["decoder.up.3.attn.2.q.weight"]
    elif change == "shape":
        state["quantize.embedding.weight"] = torch.zeros(16384, 8)
    elif change == "unexpected":
        state["model_ema.decay"] = torch.tensor(0.999)  # another module's weights: not dropped like "loss."
    checkpoint = {"missing": lightning_checkpoint(state), "shape": lightning_checkpoint(state),
                  "unexpected": lightning_checkpoint(state), "no state dict": {"epoch": 1, "global_step": 2},
                  "llamagen": {"model": state}, "kind": {"kind": "mnist-vq", "config": {}, "model": {}},
                  "junk": None, "absent": None}[change]
    if change == "junk":
        path.write_bytes(b"PK\x03\x04 cut short")
    elif checkpoint is not None:
        torch.save(checkpoint, path)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_ldm(NAME, str(path))
    assert "\n" not in str(error.value)
    assert error.match(WRONG_CHECKPOINTS[change].format(path=path))


# ---- tokenizer.py encode --tokenizer ldm-vq8, then train.py and sample.py through the code set's record ----

def test_encode_an_imagefolder_tree_then_sample_through_the_record(model, ckpt, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("n01440764", "n01443537"):  # 2 classes of 2 random images of odd sizes, as test_imagefolder.py
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (rng.integers(34, 60), rng.integers(34, 60), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / name / f"{i}.png")
    codes = tmp_path / "codes"
    tokenizer.main(["encode", "--tokenizer", NAME, "--tokenizer-ckpt", str(ckpt), "--dataset", "imagefolder",
                    "--data-dir", str(tmp_path / "train"), "--image-size", "32", "--workers", "0",
                    "--batch-size", "4", "--out", str(codes)])
    meta = json.loads((codes / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": NAME, "name": NAME, "ckpt": os.path.abspath(ckpt)}
    cs = codesets.CodeSet(str(codes))
    assert len(cs) == 4 and cs.views == 2 and cs.grid == (4, 4) and cs.codebook.shape == (16384, 4)
    paths, _, _ = datasets.list_imagefolder(str(tmp_path / "train"))
    pictures = torch.stack([datasets.read_image(path, 32) for path in paths])  # (4, 3, 32, 32)
    assert np.array_equal(cs.get(np.arange(4), np.zeros(4, int))[0], model.encode(pictures).numpy())
    assert isinstance(tokenizers.load_for_codes(meta, cs.codebook), LdmVQ)

    run = tmp_path / "run"
    train.main(["--codes", str(codes), "--model", "DiT-T/1", "--batch-size", "4", "--steps", "1",
                "--sample-every", "0", "--out", str(run)])
    sample.main(["--ckpt", str(run / "checkpoints" / "last.pt"), "--num-samples", "2", "--steps", "1",
                 "--out", str(tmp_path / "samples")])  # no --tokenizer: the code set's record names ldm-vq8
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 32, 32, 3) and f["arr_0"].dtype == np.uint8
