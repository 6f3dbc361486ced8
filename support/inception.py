"""
The Inception-v3 of FID and the Inception Score, in plain PyTorch: TensorFlow's graph of 2015-12-05
(inception-2015-12-05.tgz, the network of the TensorFlow evaluators: TTUR's FID, improved-gan's Inception Score
and ADM's evaluations/evaluator.py), with the PyTorch FID ports' weights file
pt_inception-2015-12-05-6726825d.pth (WEIGHTS_URL) and the graph's own input convention.

Written from its published definitions, without torchvision:
  * pytorch-fid, src/pytorch_fid/inception.py (github.com/mseitzer/pytorch-fid): `fid_inception_v3` builds
    torchvision's Inception3 with num_classes=1008 and aux_logits=False, replaces Mixed_5b-d by FIDInceptionA,
    Mixed_6b-e by FIDInceptionC, Mixed_7b by FIDInceptionE_1 and Mixed_7c by FIDInceptionE_2, and loads
    FID_WEIGHTS_URL strictly. TensorFlow's average pools leave the zero padding out of the mean
    (count_include_pad=False), and Mixed_7c max-pools in its pool branch. The pool_3 features are the average
    over the 8 x 8 map after Mixed_7c.
  * torchvision, torchvision/models/inception.py (github.com/pytorch/vision): Inception3's layers, their names
    (the keys of the weights file) and shapes, BasicConv2d (a bias-free convolution, BatchNorm with eps 0.001,
    ReLU) and InceptionA-E.
  * The input as the TensorFlow graph takes it, which is how ADM's evaluator feeds it the images' float pixels:
    the graph's ResizeBilinear to 299 x 299 (TensorFlow 1's resize_bilinear, align_corners=False, which samples
    without half-pixel centres; `resize_bilinear_tf1`), then its Sub and Mul, (x - 128) / 128. torch-fidelity
    (github.com/toshas/torch-fidelity, feature_extractor_inceptionv3.py and interpolate_compat_tensorflow.py)
    computes the input so; pytorch-fid does not (PyTorch's half-pixel resize, then x / 127.5 - 1).
  * The Inception Score's logits are pool_3 times the weights of the 1008-way layer, without its bias: ADM's
    evaluator takes `softmax/logits/MatMul`'s weight input and softmaxes `pool_3 @ w`, as improved-gan does;
    torch-fidelity's "logits_unbiased" (torch_fidelity/feature_extractor_inceptionv3.py) is the same.

What matches ADM's evaluator and what does not: the input convention above, the layout and the weights
(pytorch-fid's conversion of the graph's) match; the arithmetic need not, since PyTorch's float32 kernels (the
convolutions, pools and reductions, and the resize written here) are not TensorFlow's graph ops and may round
differently. How far that moves FID or the Inception Score has not been measured here: quote ADM's evaluator's
numbers where they must be exactly comparable with published ones.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import files

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
SIZE = 299  # the network's input: SIZE x SIZE
FEATURES = 2048  # pool_3
CLASSES = 1008  # the 1008-way softmax of the TensorFlow graph (1000 ImageNet classes and 8 unused)


# ---- The blocks (torchvision's names and shapes; the pool branches as pytorch-fid's FID variants patch them) ----

class BasicConv2d(nn.Module):
    """A convolution without bias, BatchNorm (eps 0.001) and ReLU."""

    def __init__(self, in_channels, out_channels, **kw):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """TensorFlow's 3x3 average pool (stride 1, SAME padding): the padding is not counted in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block (Mixed_5b-d): pytorch-fid's FIDInceptionA, torchvision's InceptionA with TensorFlow's pool."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):  # -> 64 + 64 + 96 + pool_features channels
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a), as torchvision's InceptionB."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):  # -> 384 + 96 + in_channels channels
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17 x 17 block with factorised 7x7 convolutions (Mixed_6b-e): pytorch-fid's FIDInceptionC."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):  # -> 4 x 192 channels
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for i in range(1, 6):
            branch7x7dbl = getattr(self, f"branch7x7dbl_{i}")(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a), as torchvision's InceptionD."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):  # -> 320 + 192 + in_channels channels
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for i in range(1, 5):
            branch7x7x3 = getattr(self, f"branch7x7x3_{i}")(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8 x 8 block with split 3x3 convolutions: pytorch-fid's FIDInceptionE_1 (Mixed_7b, pool "avg": TensorFlow's
    average pool) and FIDInceptionE_2 (Mixed_7c, pool "max": the TensorFlow graph max-pools here, unlike the
    paper and torchvision)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):  # -> 320 + 2 x 384 + 2 x 384 + 192 = 2048 channels
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl), self.branch_pool(pooled)], 1)


# ---- The network -----------------------------------------------------------------------------------------

def resize_bilinear_tf1(x, size):
    """float (B, C, H, W) -> (B, C, size[0], size[1]) as TensorFlow 1's tf.image.resize_bilinear with
    align_corners=False. Along an axis of n inputs and m outputs, output i samples the input at s = i * (n / m)
    in float32, without the half-pixel shift of PyTorch's align_corners=False (output 0 is input 0), between
    x0 = floor(s) and x1 = min(x0 + 1, n - 1) (the last row and column repeat past the edge):
    x[x0] + (x[x1] - x[x0]) * (s - x0). The width is interpolated first, then the height, as TensorFlow's kernel
    does. An axis already of its output length is left as it is (there s = i)."""
    for dim, m in ((3, size[1]), (2, size[0])):
        n = x.shape[dim]
        if n == m:
            continue
        scale = torch.tensor(n, dtype=torch.float32) / m  # n / m in float32, as TensorFlow's CalculateResizeScale
        source = torch.arange(m, dtype=torch.float32, device=x.device) * scale  # s, (m,)
        x0 = source.floor().long()
        x1 = (x0 + 1).clamp(max=n - 1)
        weight = (source - x0).view([m if d == dim else 1 for d in range(4)])  # s - x0 along `dim`
        lower, upper = x.index_select(dim, x0), x.index_select(dim, x1)
        x = upper.sub_(lower).mul_(weight).add_(lower)  # x[x0] + (x[x1] - x[x0]) * (s - x0), in place
    return x


def preprocess(images):
    """uint8 (B, H, W, 3) -> float (B, 3, 299, 299) in [-1, 127 / 128], the TensorFlow graph's input: the pixels
    as floats, resized by `resize_bilinear_tf1` (not at all when already 299 x 299), then (x - 128) / 128."""
    x = resize_bilinear_tf1(images.permute(0, 3, 1, 2).float(), (SIZE, SIZE))
    return (x - 128) / 128


class InceptionV3(nn.Module):
    """torchvision's Inception3 without the auxiliary classifier, with a 1008-way fc: the layout of the weights
    file. forward(uint8 images (B, H, W, 3)) -> (pool_3 features (B, 2048), logits (B, 1008) for the Inception
    Score, without the fc's bias)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURES, CLASSES)

    def forward(self, images):
        x = preprocess(images)  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # 35 x 35 to 5d, 17 x 17 to 6e, then (B, 2048, 8, 8)
        features = x.mean(dim=(2, 3))  # pool_3: the average over the 8 x 8 map, (B, 2048)
        return features, features @ self.fc.weight.T  # logits (B, 1008), without the bias


def check_state_dict(model, state, path):
    """Every key of the model in `state` with its shape and nothing else, or ValueError naming the first few
    differences. BatchNorm's num_batches_tracked may be absent (files converted from TensorFlow have none)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors; expected the FID Inception weights ({WEIGHTS_URL})")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)}, expected {shape}"
                 for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{path}: not the FID Inception weights ({'; '.join(problems[:3])}{more}); "
                         f"expected {WEIGHTS_FILE}, published at {WEIGHTS_URL}")


def load(path, device="cpu"):
    """The network with the weights file at `path` (loaded strictly, weights only), in eval mode on `device`.
    A missing or foreign file is a FileNotFoundError / ValueError naming it and where the weights are published."""
    state = files.load_torch(path, f"the FID Inception weights {WEIGHTS_FILE}, published at {WEIGHTS_URL}")
    model = InceptionV3()
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)
