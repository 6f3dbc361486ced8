"""experiments/studies/joint.py: which loss reaches which weights when the tokenizer trains with the flow (the
gradient path its docstring states), stages that resume and are shared between arms, and the study end to end."""

import json
import re

import numpy as np
import pytest
import torch

import vq
from conftest import FASHION_MNIST, run_cli
from experiments.studies import joint
from support import checkpoint, tokenizers

TINY = joint.BUDGETS["tiny"]


def grads(module):
    """{name: gradient} of a module's parameters (None where no gradient reached it)."""
    return {name: p.grad for name, p in module.named_parameters()}


def reached(g):
    """Whether any of these gradients is non-zero."""
    return any(v is not None and v.abs().sum() > 0 for v in g.values())


@pytest.fixture
def together():
    """An arm whose codebook moves by gradient, and the terms of one step of tokenizer and flow together."""
    arm = joint.Arm(TINY, "fmnist", 0, num_codes=32)
    x, y = torch.rand(16, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (16,))
    arm.tok.train()
    arm.tok(x)  # k-means++ initialisation of the codebook, as the first tokenizer step does
    arm.gradient_codebook()
    with torch.no_grad():  # the DiT's last layer starts at zero (adaLN-Zero): give its logits a dependence on z_t
        for p in arm.dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    step = joint.StepLoss(arm.tok, arm.flow, 8, together=True)

    def terms(flow_weight=joint.FLOW_WEIGHT):
        arm.tok.zero_grad(set_to_none=True)
        arm.dit.zero_grad(set_to_none=True)
        step.flow_weight = flow_weight
        torch.manual_seed(1)  # the same times, noise and dropped labels every call
        step.loss(arm.dit, x, y)
        return step.terms

    return arm, terms


def test_joint_grad_the_flow_reaches_the_codebook_and_the_dit_not_the_encoder_or_decoder(together):
    arm, terms = together
    terms()["flow"].backward()
    assert reached({"V": arm.tok.quantizer.weight.grad})
    assert reached(grads(arm.dit))
    assert not reached(grads(arm.tok.encoder)) and not reached(grads(arm.tok.decoder))


def test_joint_grad_the_flow_weight_scales_the_codebooks_gradient_alone(together):
    arm, terms = together
    terms(1.0)["flow"].backward()
    full, dit_full = arm.tok.quantizer.weight.grad.clone(), {k: v.clone() for k, v in grads(arm.dit).items()}
    terms(0.25)["flow"].backward()
    torch.testing.assert_close(arm.tok.quantizer.weight.grad, 0.25 * full)
    for name, g in grads(arm.dit).items():
        torch.testing.assert_close(g, dit_full[name], msg=name)
    terms(0.0)["flow"].backward()
    assert not reached({"V": arm.tok.quantizer.weight.grad})


def test_joint_grad_reconstruction_reaches_encoder_and_decoder_not_the_codebook(together):
    arm, terms = together
    terms()["rec"].backward()
    assert reached(grads(arm.tok.encoder)) and reached(grads(arm.tok.decoder))
    assert not reached({"V": arm.tok.quantizer.weight.grad})
    assert not reached(grads(arm.dit))


def test_joint_grad_codebook_term_reaches_the_codes_commitment_the_encoder():
    """L_code = |sg(u) - e_c|^2 moves the codes only, L_com = beta |u - sg(e_c)|^2 the encoder outputs only."""
    quantizer = joint.GradientCodebook(vq.VectorQuantizer(num_codes=8, dim=4))
    u = torch.nn.functional.normalize(torch.randn(20, 4), dim=1).requires_grad_()
    e = quantizer.codebook[quantizer.lookup(u.detach())]
    code_loss, commitment_loss = quantizer.losses(u, e)
    code_loss.backward(retain_graph=True)
    assert u.grad is None and quantizer.weight.grad.abs().sum() > 0
    quantizer.weight.grad = None
    commitment_loss.backward()
    assert quantizer.weight.grad is None and u.grad.abs().sum() > 0
    # their values: the mean squared distance, and beta times it
    torch.testing.assert_close(code_loss, (u - e).pow(2).mean())
    torch.testing.assert_close(commitment_loss, 0.25 * (u - e).pow(2).mean())


def test_joint_grad_decoder_sees_the_code_and_the_encoder_the_identity():
    """The straight-through estimator: forward e_c exactly, backward the identity to normalize(enc(x))."""
    quantizer = joint.GradientCodebook(vq.VectorQuantizer(num_codes=8, dim=4))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, codes, _ = quantizer(z)
    torch.testing.assert_close(z_q, quantizer.codebook.detach()[codes].permute(0, 3, 1, 2))
    weights = torch.randn_like(z_q)
    (z_q * weights).sum().backward()
    expected = torch.autograd.grad((torch.nn.functional.normalize(z, dim=1) * weights).sum(), z)[0]
    torch.testing.assert_close(z.grad, expected)


def test_joint_grad_a_frozen_tokenizer_gets_none_and_the_flow_trains_on_its_codes(together):
    arm, _ = together
    step = joint.StepLoss(arm.tok, arm.flow, 8, together=False)
    x, y = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (8,))
    arm.tok.eval()
    loss, _, _ = step.loss(arm.dit, x, y)
    loss.backward()
    assert all(g is None for g in grads(arm.tok).values())
    assert reached(grads(arm.dit))


def test_joint_a_tokenizer_stage_continued_from_a_shorter_one_is_the_unbroken_one():
    """The finetune and frozen arms go on from the joint arm's tokenizer warm-up: what they reach is what the
    tokenizer alone reaches in one go."""
    pixels = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    straight = joint.Arm(TINY, "fmnist", 3, num_codes=16)
    straight.run("tokenizer", 5, pixels, labels)
    broken = joint.Arm(TINY, "fmnist", 3, num_codes=16)
    broken.run("tokenizer", 2, pixels, labels)
    state = broken.state()
    resumed = joint.Arm(TINY, "fmnist", 3, num_codes=16)
    resumed.load(state)
    resumed.run("tokenizer", 3, pixels, labels)
    for (name, a), b in zip(straight.tok.state_dict().items(), resumed.tok.state_dict().values()):
        assert torch.equal(a, b), name


def test_joint_study_end_to_end(classifier, tmp_path):
    out = tmp_path / "study"
    args = ["joint", "--budget", "tiny", "--data-dir", FASHION_MNIST, "--classifier", classifier, "--out", out]
    rc, stdout, err = run_cli("experiments/study.py", *args)
    assert rc == 0, err[-2000:]
    name = "joint-fashion-mnist"
    record = json.loads((out / f"{name}.json").read_text())
    rows = record["rows"]
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for a in joint.ARMS for s in (0, 1))
    for r in rows:
        # what each arm trained: every arm the same updates of each part
        assert r["log"][-1]["tokenizer_step"] == TINY["tokenizer_steps"]
        flow = checkpoint.Flow(r["flow"])
        assert flow.step == TINY["flow_steps"]
        tok = tokenizers.load(r["tokenizer"])
        assert torch.equal(flow.codebook, tok.codebook)  # the flow samples the codes of the tokenizer that moved
        if r["arm"] == "frozen":
            assert r["moved"] == 0
    for suffix in ("", "-samples"):
        assert (out / f"{name}{suffix}.png").read_bytes()[:4] == b"\x89PNG"
    # each arm's first stage, the tokenizer alone, goes on from the longest one kept: joint's 1 step, finetune's 4
    trained = re.findall(r"seed (\d) (\w+): (\w+) for (\d+) steps", stdout)
    assert trained == [(s, *stage) for s in "01" for stage in (
        ("joint", "tokenizer", "1"), ("joint", "together", "5"), ("finetune", "tokenizer", "3"),
        ("finetune", "flow", "3"), ("finetune", "together", "2"), ("frozen", "tokenizer", "2"),
        ("frozen", "flow", "5"))]
    # run again: every stage is kept, nothing trains, the same rows
    rc, stdout, err = run_cli("experiments/study.py", *args, "--force")
    assert rc == 0, err[-2000:]
    assert re.findall(r"seed (\d) (\w+): (\w+) for (\d+) steps", stdout) == []
    again = json.loads((out / f"{name}.json").read_text())["rows"]
    assert [(r["arm"], r["fid"], r["moved"]) for r in again] == [(r["arm"], r["fid"], r["moved"]) for r in rows]
    # another flow weight trains only the stages together, and shares the others (the frozen arm's whole)
    rc, stdout, err = run_cli("experiments/study.py", *args, "--flow-weight", "0.5")
    assert rc == 0, err[-2000:]
    trained = re.findall(r"seed (\d) (\w+): (\w+) for (\d+) steps", stdout)
    assert trained == [(s, *stage) for s in "01" for stage in (("joint", "together", "5"),
                                                                ("finetune", "together", "2"))]
    half = json.loads((out / f"{name}-w0.5.json").read_text())
    assert half["flow_weight"] == 0.5
    assert ([r["fid"] for r in half["rows"] if r["arm"] == "frozen"] ==
            [r["fid"] for r in rows if r["arm"] == "frozen"])
    for r, h in zip(rows, half["rows"]):  # each weight's arms keep their own tokenizer and flow
        assert (r["flow"] == h["flow"]) == (r["arm"] == "frozen")
        assert torch.equal(checkpoint.Flow(r["flow"]).codebook, tokenizers.load(r["tokenizer"]).codebook)
    # another budget's stages are refused
    settings = out / name / "settings.json"
    settings.write_text(json.dumps(dict(json.loads(settings.read_text()), flow_steps=7)))
    rc, _, err = run_cli("experiments/study.py", *args, "--force")
    assert rc == 2 and err.strip().count("\n") == 0 and "other settings" in err


@pytest.mark.parametrize("flags,message", [
    ([], "--data-dir"),
    (["--data-dir", FASHION_MNIST, "--flow-weight", "-1"], "--flow-weight -1"),
    (["--data-dir", FASHION_MNIST, "--flow-weight", "nan"], "--flow-weight nan")])
def test_joint_bad_input_is_one_line_before_any_work(flags, message, tmp_path):
    rc, _, err = run_cli("experiments/study.py", "joint", "--budget", "tiny", "--out", tmp_path, *flags)
    assert rc == 2 and message in err and err.strip().count("\n") == 0
    np.testing.assert_equal(list(tmp_path.iterdir()), [])
