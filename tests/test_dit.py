"""The DiT backbone: shapes, zero init, conditioning, patches and positions, and presets."""

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dit import DiT, DiT_models, build_dit, modulate, patchify, sincos_2d, unpatchify


def tiny(grid_size=8, patch_size=2, in_dim=4, out_dim=16, num_classes=10, input_vocab=None):
    return DiT(grid_size, in_dim, out_dim, num_classes, patch_size=patch_size, hidden_size=32, depth=2,
               num_heads=4, input_vocab=input_vocab)


def perturb_final_layer(model, std=0.1):
    """The final layer starts at zero; give it random weights so the output depends on the input."""
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(std=std)


def inputs(B=3, grid_size=8, in_dim=4, num_classes=10):
    return torch.randn(B, grid_size, grid_size, in_dim), torch.rand(B), torch.randint(0, num_classes + 1, (B,))


# ---- shapes and initialisation -----------------------------------------------------------------------------

@pytest.mark.parametrize("patch_size", [1, 2])
def test_output_shape_continuous_input(patch_size):
    model = tiny(patch_size=patch_size)
    x, t, y = inputs()
    assert model(x, t, y).shape == (3, 8, 8, 16)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_output_shape_discrete_input(patch_size):
    """DFM's tokens are embedded straight into the model width (32 here), not into the code dimension."""
    model = tiny(patch_size=patch_size, input_vocab=17)
    x = torch.randint(0, 17, (3, 8, 8))
    assert model.token_embedder.weight.shape == (17, 32)
    assert model.patch_embed.weight.shape == (32, patch_size * patch_size * 32)
    assert model(x, torch.rand(3), torch.randint(0, 11, (3,))).shape == (3, 8, 8, 16)


def test_output_is_exactly_zero_at_init():
    model = tiny()
    assert torch.equal(model(*inputs()), torch.zeros(3, 8, 8, 16))


def test_blocks_are_identity_at_init():
    model = tiny()
    x = torch.randn(2, model.num_tokens, 32)
    c = torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)


def test_pos_embed_is_a_buffer_not_a_parameter():
    model = tiny()
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()
    assert model.num_params() == sum(p.numel() for p in model.parameters())


# ---- conditioning ------------------------------------------------------------------------------------------

def test_output_depends_on_label_and_time_once_final_layer_is_nonzero():
    model = tiny()
    perturb_final_layer(model)
    x, t, y = inputs()
    out = model(x, t, y)
    assert not torch.allclose(model(x, t, (y + 1) % 11), out)
    assert not torch.allclose(model(x, (t + 0.5) % 1, y), out)
    assert torch.equal(model(x, t, y), out)


def test_null_class_is_the_last_row():
    model = tiny(num_classes=10)
    assert model.y_embedder.embedding.num_embeddings == 11
    perturb_final_layer(model)
    x, t, _ = inputs(B=2)
    null = torch.full((2,), 10)
    model(x, t, null)  # the null index is valid
    with pytest.raises(IndexError):
        model(x, t, torch.full((2,), 11))


def test_unconditional_model_has_one_label_row():
    model = tiny(num_classes=0)
    assert model.y_embedder.embedding.num_embeddings == 1
    x, t, _ = inputs(B=2)
    assert model(x, t, torch.zeros(2, dtype=torch.long)).shape == (2, 8, 8, 16)


def test_swapping_two_images_swaps_outputs():
    model = tiny()
    perturb_final_layer(model)
    x, t, y = inputs(B=4)
    perm = torch.tensor([1, 0, 2, 3])
    out = model(x, t, y)
    torch.testing.assert_close(model(x[perm], t[perm], y[perm]), out[perm], rtol=1e-5, atol=1e-6)


def test_positions_matter():
    """With the positional embedding, a grid whose patches are all equal still gives position-dependent output."""
    model = tiny(patch_size=1)
    perturb_final_layer(model)
    x = torch.ones(1, 8, 8, 4)
    out = model(x, torch.rand(1), torch.zeros(1, dtype=torch.long))
    assert not torch.allclose(out[0, 0, 0], out[0, 5, 3])


# ---- patches and positions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_unpatchify_round_trip_is_exact(p):
    x = torch.randn(2, 8, 8, 3)
    patches = patchify(x, p)
    assert patches.shape == (2, (8 // p) ** 2, p * p * 3)
    assert torch.equal(unpatchify(patches, p, 8), x)


def test_patchify_layout():
    """Patch index is row-major over the patch grid; inside a patch, (row, column, channel) order."""
    x = torch.arange(4 * 4 * 2).reshape(1, 4, 4, 2)
    patches = patchify(x, 2)
    # patch 1 is the top-right 2 x 2 block: rows 0-1, columns 2-3
    torch.testing.assert_close(patches[0, 1], x[0, 0:2, 2:4].reshape(-1))
    torch.testing.assert_close(patches[0, 2], x[0, 2:4, 0:2].reshape(-1))


def unpatchified(model, x, t, y):
    """The model's output as the unpatchify of its final Linear's token-order output, (B, T, p * p * out_dim):
    the layout's definition, computed from the final layer's input."""
    seen = {}
    hook = model.final_layer.register_forward_pre_hook(lambda module, args: seen.update(args=args))
    try:
        model(x, t, y)
    finally:
        hook.remove()
    h, c = seen["args"]
    final = model.final_layer
    shift, scale = final.adaLN_modulation(c).chunk(2, dim=1)
    return unpatchify(final.linear(modulate(final.norm_final(h), shift, scale)), model.patch_size, model.grid_size)


@pytest.mark.parametrize("patch_size", [1, 2, 4])
@pytest.mark.parametrize("autocast", [False, True])
def test_output_is_the_unpatchify_of_the_final_linear(patch_size, autocast):
    """Without gradients the final layer writes each position of a patch straight to its place on the grid: the
    numbers of unpatchify(linear(x)), what it computes with gradients, to float rounding (each block of the Linear
    is its own matrix product)."""
    model = tiny(patch_size=patch_size, out_dim=6)
    perturb_final_layer(model)
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected, trained = unpatchified(model, x, t, y), model(x, t, y)
        with torch.no_grad():
            sampled = model(x, t, y)
    assert sampled.shape == expected.shape == (3, 8, 8, 6) and sampled.dtype == expected.dtype
    assert sampled.is_contiguous()
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(trained, expected)


class Allocations(TorchDispatchMode):
    """The storages ops make while it is on, each counted once (a view or an in-place result makes none): their
    sizes in bytes, and the peak of the bytes that those of at least `at_least` bytes hold together (a storage
    is freed when its last tensor goes: a weakref finalizer)."""

    def __init__(self, at_least):
        super().__init__()
        self.at_least, self.sizes, self.live, self.peak = at_least, [], 0, 0
        self.seen = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for o in tree_leaves(out):
                storage = o.untyped_storage() if isinstance(o, torch.Tensor) else None
                if storage is None or storage in self.seen or storage.nbytes() < self.at_least:
                    continue
                self.seen.add(storage)
                self.sizes.append(storage.nbytes())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self.free, storage.nbytes())
        return out

    def free(self, nbytes):
        self.live -= nbytes


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_the_output_is_made_once(patch_size):
    """Without gradients, the output (K logits a position: the largest tensor of a pass) is made once and never
    copied: besides it, the forward makes its p * p parts, one at a time, so that it peaks at (1 + 1 / p^2) x the
    output (2 x for an unpatchify of the whole, whose reshape copies it)."""
    model = tiny(patch_size=patch_size, out_dim=512)  # output 3 x 8 x 8 x 512: a p^2-th of it outweighs all else
    perturb_final_layer(model)
    x, t, y = inputs()
    size = 3 * 8 * 8 * 512 * 4
    part = size // patch_size ** 2
    with torch.no_grad(), Allocations(at_least=part) as made:
        out = model(x, t, y)
    assert out.untyped_storage().nbytes() == size
    if patch_size == 1:
        assert made.sizes == [size]  # the Linear's output itself: a token is a position
    else:
        assert sorted(made.sizes) == [part] * patch_size ** 2 + [size]
    assert made.peak == size + (part if patch_size > 1 else 0)


def test_sincos_2d_matches_float64_reference():
    dim, g = 16, 5
    emb = sincos_2d(dim, g)
    assert emb.shape == (g * g, dim) and emb.dtype == torch.float32
    quarter = dim // 4
    omega = [10000 ** (-i / quarter) for i in range(quarter)]
    for index in (0, 3, 7, 24):
        row, col = divmod(index, g)
        expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                    + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
        torch.testing.assert_close(emb[index], torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)
    # the patch at the origin: sin 0 = 0, cos 0 = 1 in both halves
    assert torch.equal(emb[0], torch.tensor(([0.0] * quarter + [1.0] * quarter) * 2))


# ---- errors, presets -----------------------------------------------------------------------------------------

def test_patch_size_must_divide_grid():
    with pytest.raises(ValueError, match="patch_size 2 does not divide grid_size 7"):
        tiny(grid_size=7, patch_size=2)


def test_unknown_preset_names_itself_and_the_choices():
    with pytest.raises(ValueError, match="unknown model 'DiT-Q/3'.*DiT-XL/2"):
        build_dit("DiT-Q/3", grid_size=8, in_dim=4, out_dim=4, num_classes=0)


SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (4, 128, 4)}


def test_registry_keys():
    assert set(DiT_models) == {"DiT-XL/2", "DiT-XL/4", "DiT-L/2", "DiT-L/4", "DiT-B/1", "DiT-B/2", "DiT-B/4",
                               "DiT-S/1", "DiT-S/2", "DiT-S/4", "DiT-T/1", "DiT-T/2"}


@pytest.mark.parametrize("name", list(DiT_models))
def test_every_preset_builds_with_paper_sizes(name):
    size, patch = name[len("DiT-"):].split("/")
    with torch.device("meta"):
        model = build_dit(name, grid_size=16, in_dim=8, out_dim=8, num_classes=1000)
    assert (model.depth, model.hidden_size, model.num_heads) == SIZES[size]
    assert model.patch_size == int(patch)
    assert len(model.blocks) == model.depth


def test_dit_xl_2_parameter_count():
    """DiT-XL/2 at 32 x 32 with 4 input channels and 8 outputs (learned sigma): 675M parameters in the paper."""
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", grid_size=32, in_dim=4, out_dim=8, num_classes=1000)
    assert model.num_params() == pytest.approx(675e6, rel=0.005)


def test_tiny_preset_runs_on_cpu():
    model = build_dit("DiT-T/1", grid_size=7, in_dim=8, out_dim=64, num_classes=10)
    out = model(torch.randn(2, 7, 7, 8), torch.rand(2), torch.tensor([3, 10]))
    assert out.shape == (2, 7, 7, 64)


# ---- precision and compilation -----------------------------------------------------------------------------

def test_bf16_autocast_runs_and_stays_close():
    model = tiny()
    perturb_final_layer(model)
    x, t, y = inputs()
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_forward_traces_as_one_graph():
    """No graph breaks under torch.compile (tracing only; the eager backend skips code generation)."""
    model = tiny(input_vocab=17)
    perturb_final_layer(model)
    x, t, y = torch.randint(0, 17, (2, 8, 8)), torch.rand(2), torch.randint(0, 11, (2,))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
    with torch.no_grad():  # the final layer's other path
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
