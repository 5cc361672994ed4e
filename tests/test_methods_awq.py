"""AWQ per layer against AutoAWQ 0.2.9's own AwqQuantizer._search_best_scale, _compute_best_clip,
apply_scale/apply_clip and pseudo_quantize_tensor, on small torch modules (float32, as a float32
model runs them).

- The chosen ratio equals AutoAWQ's unless the two losses are within rounding of a tie
  (relative difference below TIE; the losses are float32 sums in another order).
- The chosen clip (shrink step per row and group) equals AutoAWQ's unless the errors of the two
  steps are within TIE of each other.
- Given AutoAWQ's chosen scales and clips, the fp16 codes, zeros and scales are equal.

_compute_best_scale saves the weights as `{k: v.cpu() for k, v in module2inspect.state_dict()}`
and scales them in place (fc.weight.mul_) before restoring that copy. On the GPU AutoAWQ runs on,
.cpu() copies; on a CPU module it returns the same storage, the "saved" weights are the scaled
ones, and every grid point compounds the previous scales. The test modules therefore hand out
copies from state_dict(), as a CUDA module does: AutoAWQ's own code and arithmetic are unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

import oracles_methods as om
from ci_skips import oracle_import
from refinfer.methods import awq

TIE = 1e-5          # relative; the float32 losses differ by ~1e-7 between torch and NumPy


def silu(x):
    return x / (1 + np.exp(-x))


def make(seed, K=256, H=384, T=96):
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 1, (T, K)) * np.exp(rng.normal(0, 1.2, K))).astype(np.float32)   # outlier channels
    Wg, Wu = [(0.05 * rng.standard_t(5, (H, K))).astype(np.float32) for _ in range(2)]
    Wd = (0.05 * rng.standard_t(5, (K, H))).astype(np.float32)
    return x, Wg, Wu, Wd


def copying(cls):
    """cls whose state_dict() holds copies, as .cpu() of a CUDA module's state makes them."""
    class Copying(cls):
        def state_dict(self, *a, **k):
            return {n: v.clone() for n, v in super().state_dict(*a, **k).items()}
    Copying.__name__ = cls.__name__
    return Copying


def torch_mlp(Wg, Wu, Wd):
    torch = oracle_import("torch")
    nn = torch.nn
    Linear = copying(nn.Linear)

    @copying
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = Linear(*Wg.shape[::-1], bias=False), Linear(*Wu.shape[::-1], bias=False)
            self.down_proj = Linear(*Wd.shape[::-1], bias=False)
            for m, w in ((self.gate_proj, Wg), (self.up_proj, Wu), (self.down_proj, Wd)):
                m.weight.data = torch.from_numpy(w.copy())

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.post_attention_layernorm = nn.Identity()
            self.mlp = MLP()

    return Layer()


def oracle_search(q, layer, prev_op, layers, x, module2inspect=None):
    torch = oracle_import("torch")
    losses = []
    real = q._compute_loss

    def observe(*a):
        losses.append(real(*a))
        return losses[-1]

    q._compute_loss = observe               # observed, not altered
    _, _, scales = q._search_best_scale(layer, prev_op, layers, torch.from_numpy(x), module2inspect=module2inspect)
    del q._compute_loss
    return scales.numpy(), losses


def check_ratio(ours: awq.ScaleSearch, ref_losses):
    ref_ratio = int(np.argmin(ref_losses)) / awq.N_GRID
    if ours.ratio != ref_ratio:
        a, b = ref_losses[int(ours.ratio * awq.N_GRID)], min(ref_losses)
        assert abs(a - b) <= TIE * b, f"ratio {ours.ratio} vs AutoAWQ's {ref_ratio}: losses {a} vs {b}"
    # pow() differs by an ulp between torch and NumPy, so W*s can flip a code at a near-tie: measured <= 1.5e-4
    np.testing.assert_allclose(ours.losses, ref_losses, rtol=1.5e-3)


@pytest.mark.parametrize("duo", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_scale_search_mlp_group_equals_autoawq(seed, duo):
    """post_attention_layernorm -> [gate, up], inspected through the MLP output."""
    x, Wg, Wu, Wd = make(seed)
    layer = torch_mlp(Wg, Wu, Wd)
    q = om.awq_quantizer(group_size=64, duo_scaling=duo)
    ref_scales, ref_losses = oracle_search(q, layer, layer.post_attention_layernorm,
                                           [layer.mlp.gate_proj, layer.mlp.up_proj], x, module2inspect=layer.mlp)
    ours = awq.search_best_scale(x, [Wg, Wu], lambda ws: (silu(x @ ws[0].T) * (x @ ws[1].T)) @ Wd.T,
                                 group_size=64, duo_scaling=duo)
    check_ratio(ours, ref_losses)
    if ours.ratio == int(np.argmin(ref_losses)) / awq.N_GRID:
        np.testing.assert_allclose(ours.scales, ref_scales, rtol=1e-5)   # pow and sums: measured <= 5e-7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_search_down_proj_equals_autoawq(seed):
    """up_proj -> [down_proj], inspected through down_proj alone."""
    x, Wg, Wu, Wd = make(seed)
    layer = torch_mlp(Wg, Wu, Wd)
    h = (silu(x @ Wg.T) * (x @ Wu.T)).astype(np.float32)
    q = om.awq_quantizer(group_size=128)
    ref_scales, ref_losses = oracle_search(q, layer, layer.mlp.up_proj, [layer.mlp.down_proj], h)
    ours = awq.search_best_scale(h, [Wd], lambda ws: h @ ws[0].T, group_size=128)
    check_ratio(ours, ref_losses)


@pytest.mark.parametrize("gs", [32, 128])
def test_clip_and_codes_equal_autoawq(gs):
    torch = oracle_import("torch")
    _, scale_mod = om.autoawq()
    x, Wg, Wu, Wd = make(3, T=1100)               # > 512 tokens: the sampling step is 2
    layer = torch_mlp(Wg, Wu, Wd)
    h = (silu(x @ Wg.T) * (x @ Wu.T)).astype(np.float32)
    q = om.awq_quantizer(group_size=gs)
    ref_scales, _ = oracle_search(q, layer, layer.mlp.up_proj, [layer.mlp.down_proj], h)
    # AutoAWQ's apply_scale (up rows / s, down columns * s, cached input / s), then its clip search
    feat = {"mlp.down_proj": torch.from_numpy(h.copy())}
    scale_mod.apply_scale(layer, [("mlp.up_proj", ("mlp.down_proj",), torch.from_numpy(ref_scales))], feat)
    ref_max = q._compute_best_clip(layer.mlp.down_proj.weight.data, feat["mlp.down_proj"]).numpy()[:, :, 0]
    scale_mod.apply_clip(layer, [("mlp.down_proj", torch.from_numpy(ref_max[:, :, None]))])
    w16 = layer.mlp.down_proj.weight.data.half()
    owq, oscales, ozeros = q.pseudo_quantize_tensor(w16)
    # ours, from the same scales
    Wd_s = Wd * ref_scales[None, :]
    np.testing.assert_array_equal(Wd_s, layer_weight_before_clip(Wd, ref_scales))
    clip = awq.compute_best_clip(Wd_s, h / ref_scales[None, :], group_size=gs)
    diff = clip.max_val != ref_max
    if diff.any():   # each must be a tie of the two steps' errors
        rows, groups = np.nonzero(diff)
        ref_step = np.rint((1 - ref_max / np.abs(Wd_s.reshape(Wd.shape[0], -1, gs)).max(-1)) * 20).astype(int)
        e = clip.errors
        for r, g in zip(rows, groups):
            a, b = e[clip.step[r, g], r, g], e[ref_step[r, g], r, g]
            assert abs(a - b) <= TIE * max(a, b), (r, g, a, b)
    assert diff.mean() < 0.01                     # measured 0
    t = awq.quantize_weight(awq.apply_clip(Wd_s, ref_max), group_size=gs)
    np.testing.assert_array_equal(t.scales, oscales.numpy().astype(np.float32))
    np.testing.assert_array_equal(t.zeros, ozeros.numpy().astype(np.int16))
    np.testing.assert_array_equal(t.dequantize(), owq.numpy().astype(np.float32))   # one-to-one in the codes


def layer_weight_before_clip(Wd, s):
    torch = oracle_import("torch")
    w = torch.from_numpy(Wd.copy())
    w.mul_(torch.from_numpy(s).view(1, -1))      # scale_fc_fc's fc2.weight.mul_
    return w.numpy()
