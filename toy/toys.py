"""
2D toy codebooks: K points in R^2 and a known distribution over code indices, small enough to run in seconds
and exact enough to check a sampler against.

A toy sample is N tokens (N = 1 or 2 here), each a code index into the toy's codebook. The distribution is
given by its support: J joint configurations (J, N) and their probabilities (J,). That makes the posterior of
the flow exact in closed form. With z_t = (1 - t) z0 + t E[c] and z0 ~ N(0, I), token by token
    p(z_t | c) = N(z_t; t E[c], (1 - t)^2 I),
so over the joint configurations
    p_t(c | z) ∝ p(c) prod_i N(z_i; t e_{c_i}, (1 - t)^2 I)
and Purrception's mean-field posterior q(c_i | z) is this posterior's marginal at token i. For N = 1 it is the
formula of the paper, p_t(c | z) ∝ p(c) N(z; t e_c, (1 - t)^2 I). `Oracle` returns the log of these marginals
as "logits": fed to Purrception's sampler, it must reproduce p(c) up to discretisation error, which tests the
sampler apart from any training. For N = 2 the marginals of each token depend on the other token's z through
the joint posterior: the coupling a mean-field posterior gets from reading all of z_t.
"""

import itertools

import numpy as np
import torch


class Toy:
    """A codebook (K, 2) and a distribution over token configurations (J, N) with probabilities (J,)."""

    def __init__(self, name, codebook, configs, probs, description):
        self.name, self.description = name, description
        self.codebook = torch.as_tensor(codebook, dtype=torch.float32)  # (K, 2)
        self.configs = torch.as_tensor(configs, dtype=torch.long)  # (J, N)
        probs = torch.as_tensor(probs, dtype=torch.float64)
        self.probs = probs / probs.sum()  # (J,)
        self.num_codes, self.num_tokens = len(self.codebook), self.configs.shape[1]

    def sample(self, n, generator=None):
        """n samples of code indices, (n, N)."""
        j = torch.multinomial(self.probs.float(), n, replacement=True, generator=generator)
        return self.configs[j]

    def joint_index(self, codes):
        """Flatten (n, N) code tuples to one index in [0, K^N)."""
        index = torch.zeros(len(codes), dtype=torch.long)
        for i in range(self.num_tokens):
            index = index * self.num_codes + codes[:, i].cpu()
        return index

    def histogram(self, codes):
        """Empirical distribution over all K^N joint configurations."""
        counts = torch.bincount(self.joint_index(codes), minlength=self.num_codes ** self.num_tokens)
        return counts.double() / max(len(codes), 1)

    def true_histogram(self):
        p = torch.zeros(self.num_codes ** self.num_tokens, dtype=torch.float64)
        return p.index_add_(0, self.joint_index(self.configs), self.probs)

    def tv(self, codes):
        """Total-variation distance between the generated histogram and p(c): 0.5 * sum |p_hat - p|."""
        return 0.5 * (self.histogram(codes) - self.true_histogram()).abs().sum().item()


class Oracle(torch.nn.Module):
    """The exact posterior marginals log p_t(c_i = k | z) as a model(z, t, y) -> logits (B, N, K).

    `codebook` is the one the flow runs on (vfm.flow_codebook of the toy's), so the posterior is exact there.
    """

    def __init__(self, toy, codebook):
        super().__init__()
        self.codebook, self.configs = codebook.double(), toy.configs
        self.log_prior = toy.probs.log()  # (J,)
        onehot = torch.nn.functional.one_hot(toy.configs, toy.num_codes).double()  # (J, N, K)
        self.register_buffer("onehot", onehot)

    def forward(self, z, t, y=None):
        z, t = z.double(), t.double().view(-1, 1, 1, 1)  # z (B, N, 2)
        means = t * self.codebook[self.configs][None]  # (B, J, N, 2): t e_{c_i} for every configuration
        sq = (z[:, None] - means).pow(2).sum(-1).sum(-1)  # (B, J)
        log_post = self.log_prior[None] - sq / (2 * (1 - t.view(-1, 1)).clamp_min(1e-6) ** 2)
        post = torch.softmax(log_post, dim=1)  # (B, J)
        marginal = torch.einsum("bj,jnk->bnk", post, self.onehot)  # (B, N, K)
        return marginal.clamp_min(1e-30).log().float()


# ---- The toys --------------------------------------------------------------------------------------------

def _grid(n, half_width):
    axis = np.linspace(-half_width, half_width, n)
    return np.array([(x, y) for y in axis[::-1] for x in axis])  # row-major, top row first


def checkerboard():
    """An 8 x 8 grid of codes; p(c) is uniform over the 32 'black' cells and zero on the white ones."""
    n = 8
    codebook = _grid(n, 1.5)
    black = [i for i in range(n * n) if (i // n + i % n) % 2 == 0]
    return Toy("checkerboard", codebook, [[i] for i in black], np.ones(len(black)),
               "8x8 grid of 64 codes, uniform over the 32 black cells")


def rings():
    """Three concentric rings of 8, 16 and 24 codes; a ring's codes are equally likely, p(ring) ∝ its radius."""
    points, probs = [], []
    for radius, count in ((0.5, 8), (1.0, 16), (1.5, 24)):
        for a in np.linspace(0, 2 * np.pi, count, endpoint=False):
            points.append((radius * np.cos(a), radius * np.sin(a)))
            probs.append(radius / count)
    return Toy("rings", np.array(points), [[i] for i in range(len(points))], np.array(probs),
               "3 rings of 8/16/24 codes, p(ring) proportional to its radius")


def pairs():
    """Two tokens on a 4 x 4 grid: the first uniform, the second uniform over the first one's row.

    Each token alone is uniform over the 16 codes, but only 64 of the 256 pairs occur: a sampler whose tokens
    ignore each other reaches TV 0.75, so the coupling through z_t is what a model must learn.
    """
    n = 4
    codebook = _grid(n, 1.5)
    configs = [(a, b) for a, b in itertools.product(range(n * n), repeat=2) if a // n == b // n]
    return Toy("pairs", codebook, configs, np.ones(len(configs)),
               "2 tokens on a 4x4 grid, the second in the first one's row")


TOYS = {"checkerboard": checkerboard, "rings": rings, "pairs": pairs}


def make_toy(name):
    if name not in TOYS:
        raise ValueError(f"unknown toy '{name}'; choose from: {', '.join(TOYS)}")
    return TOYS[name]()
