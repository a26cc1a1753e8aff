"""textune.speedups: the dropout with 16-bit draws keeps dropout's statistics and gradient; the frozen weights'
autocast copies give the same numbers as autocast's own casts; a LoRA run says which speed-ups it took."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import toy_overrides
from textune.speedups import BitsDropout, keep_autocast_copies, use_bits_dropout


def test_bits_dropout_drops_the_asked_share_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = BitsDropout(0.1).train()
    out = drop(torch.ones(2_000_001))  # not a multiple of 4: the last draw word is cut
    dropped = (out == 0).double().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.001)  # binomial std at 2M elements: 0.0002
    assert out.mean().item() == pytest.approx(1.0, abs=0.002)
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.9, rel=1e-4)]


def test_bits_dropout_masks_the_gradient_like_the_output_and_follows_the_seed():
    x = torch.randn(7, 33, requires_grad=True)
    drop = BitsDropout(0.3).train()
    torch.manual_seed(5)
    out = drop(x)
    out.sum().backward()
    kept = out != 0
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], drop.scale))
    torch.manual_seed(5)  # checkpoints restore the RNG: a resumed run draws the same masks
    assert torch.equal(drop(x), out)


def test_bits_dropout_is_the_identity_in_evaluation_and_for_p_zero():
    x = torch.randn(4, 5)
    assert torch.equal(BitsDropout(0.5).eval()(x), x)
    assert torch.equal(BitsDropout(0.0).train()(x), x)


def test_every_dropout_with_p_above_zero_is_swapped():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2), nn.Dropout(0.0)))
    assert use_bits_dropout(model) == 2
    assert [type(m).__name__ for m in model.modules() if isinstance(m, nn.Dropout)] == \
        ["BitsDropout", "BitsDropout", "Dropout"]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.2, 0.0]


def frozen_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    net[0].requires_grad_(False)  # frozen, as a LoRA base layer; net[2] trains
    return net


def test_autocast_copies_give_the_same_outputs_and_gradients():
    x = torch.randn(5, 16)
    results = []
    for copies in (False, True):
        net = frozen_net()
        if copies:
            assert keep_autocast_copies(net, "bf16") == 16 * 32 + 32  # the frozen layer only
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().sum().backward()
        results.append((out, net[2].weight.grad))
        assert torch.equal(net(x), frozen_net()(x))  # outside autocast: the fp32 weights, as before
        assert {k: v.dtype for k, v in net.state_dict().items()} == dict.fromkeys(net.state_dict(), torch.float32)
    (out_cast, grad_cast), (out_copy, grad_copy) = results
    assert torch.equal(out_cast, out_copy) and torch.equal(grad_cast, grad_copy)


def test_no_copies_without_autocast_or_for_trained_layers():
    assert keep_autocast_copies(frozen_net(), "no") == 0
    net = frozen_net().requires_grad_(True)
    assert keep_autocast_copies(net, "bf16") == 0


def test_a_lora_run_says_its_speed_ups_and_trains_with_them(tiny_model, toy_data, tmp_path, capsys):
    from textune.config import load_config
    from textune.train import train

    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "run", **{
        "tuning.method": "lora", "train.max_steps": 2, "train.mixed_precision": "bf16"}))
    train(cfg)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("speed-ups"))
    assert "dropout layers draw 16-bit masks" in line and "frozen weights kept in bf16 for autocast" in line
