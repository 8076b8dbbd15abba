"""``lstmlab.analysis.recording.record``: the recorded gates are the model's own computation, on every backend."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lstmlab.analysis.recording import GATE_NAMES, LayerRecord, record
from lstmlab.config import ModelConfig
from lstmlab.errors import LstmlabError
from lstmlab.model import SequenceClassifier
from lstmlab.nn.lstm import _layer_backends

BACKENDS = ["reference", "torch", "fused"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny step-by-step ops gain nothing from threads, and OpenMP spinning on a shared machine costs 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(backend: str, layers: int, bidirectional: bool, seed: int = 0) -> SequenceClassifier:
    if backend != "torch" and backend not in _layer_backends():
        pytest.skip(f"backend {backend} is not built in this installation")
    torch.manual_seed(seed)
    cfg = ModelConfig(input_size=5, hidden_size=7, num_layers=layers, num_classes=4,
                      bidirectional=bidirectional, forget_bias=1.0, backend=backend)
    return SequenceClassifier(cfg).eval()


def _previous(r: LayerRecord, state: Tensor) -> Tensor:
    """The state (B, T, H) each step of ``r`` started from, by input position: zeros before the first step read."""
    zeros = torch.zeros_like(state[:, :1])
    return torch.cat([zeros, state[:, :-1]], 1) if r.direction == 0 else torch.cat([state[:, 1:], zeros], 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_record_matches_model(backend: str, layers: int, bidirectional: bool) -> None:
    model = _model(backend, layers, bidirectional)
    x = torch.randn(3, 9, 5)
    rec = record(model, x)
    out, (h_n, c_n) = model.lstm(x)  # the model's own backend
    d = 2 if bidirectional else 1
    assert len(rec.layers) == layers * d
    for k, r in enumerate(rec.layers):
        assert (r.layer, r.direction) == (k // d, k % d)
        for name in GATE_NAMES:
            assert r[name].shape == (3, 9, 7)
        torch.testing.assert_close(r.final_h, h_n[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.final_c, c_n[k], atol=1e-5, rtol=1e-5)
    last = torch.cat([r.h for r in rec.layers[-d:]], dim=2)  # (B, T, D*H)
    torch.testing.assert_close(last, out, atol=1e-5, rtol=1e-5)
    # Gates are consistent with the recorded states: c_t = f c_{t-1} + i g, h_t = o tanh(c_t).
    for r in rec.layers:
        torch.testing.assert_close(r.c, r.f * _previous(r, r.c) + r.i * r.g, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r.h, r.o * torch.tanh(r.c), atol=1e-6, rtol=1e-6)
        assert 0 <= r.i.min() and r.i.max() <= 1 and 0 <= r.f.min() and r.f.max() <= 1
    expected = torch.softmax(model(x), dim=1)
    torch.testing.assert_close(torch.softmax(rec.logits, 1), expected, atol=1e-5, rtol=1e-5)
    assert rec.probs is not None and rec.probs.shape == (3, 9, 4)
    torch.testing.assert_close(rec.probs[:, -1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec.probs.sum(-1), torch.ones(3, 9), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_per_step_probs_are_prefix_predictions(bidirectional: bool) -> None:
    """probs[:, t] is the model's prediction on the sequence cut after step t, by definition."""
    model = _model("torch", 2, bidirectional, seed=3)
    x = torch.randn(2, 6, 5)
    rec = record(model, x)
    for t in range(6):
        torch.testing.assert_close(rec.probs[:, t], torch.softmax(model(x[:, : t + 1]), 1), atol=1e-5, rtol=1e-5)


def test_reverse_direction_is_aligned_with_input_position() -> None:
    model = _model("reference", 1, True)
    x = torch.randn(1, 5, 5)
    rev = record(model, x).get(0, 1)
    x2 = x.clone()
    x2[:, 0] += 1.0  # changing the first input changes the reverse direction only at t = 0
    rev2 = record(model, x2).get(0, 1)
    torch.testing.assert_close(rev.h[:, 1:], rev2.h[:, 1:])
    assert not torch.allclose(rev.h[:, 0], rev2.h[:, 0])


def test_long_bidirectional_sequences_skip_per_step_probs() -> None:
    model = _model("reference", 1, True)
    x = torch.randn(1, 12, 5)
    rec = record(model, x, max_prefix_steps=8)
    assert rec.probs is None and "O(T^2)" in rec.probs_note
    torch.testing.assert_close(rec.logits, model(x), atol=1e-5, rtol=1e-5)  # the whole-sequence output still is


def test_record_uses_eval_semantics_and_leaves_model_alone() -> None:
    torch.manual_seed(1)
    model = SequenceClassifier(ModelConfig(input_size=5, hidden_size=7, num_layers=2, num_classes=4, dropout=0.5,
                                           backend="reference"))
    model.train()
    x = torch.randn(2, 4, 5)
    rec = record(model, x)
    assert model.training  # recording did not switch modes
    model.eval()
    torch.testing.assert_close(torch.softmax(rec.logits, 1), torch.softmax(model(x), 1), atol=1e-5, rtol=1e-5)


def test_bad_input_and_layer_are_one_line_errors() -> None:
    model = _model("reference", 1, False)
    with pytest.raises(LstmlabError, match=r"expected input of shape \(B, T, 5\)"):
        record(model, torch.randn(2, 4, 3))
    rec = record(model, torch.randn(1, 3, 5))
    with pytest.raises(LstmlabError, match="has 1 layer"):
        rec.get(layer=1)
    with pytest.raises(LstmlabError, match="bidirectional"):
        rec.get(direction=1)


# ---------------------------------------------------------------------------------------------
# the variants' own terms (LayerRecord.extra), each recomputed here from the recorded gates and the weights


def _variant(cell: str = "lstm", zoneout: float | tuple[float, float] = 0.0, layers: int = 1,
             bidirectional: bool = True) -> SequenceClassifier:
    """A variant model with random extra parameters (fresh ones are zero peepholes and unit gains, which would hide
    a mixed-up term)."""
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(input_size=5, hidden_size=7, num_layers=layers, num_classes=4,
                                           bidirectional=bidirectional, backend="reference", cell=cell,
                                           zoneout=list(zoneout) if isinstance(zoneout, tuple) else zoneout)).eval()
    with torch.no_grad():
        for name, p in model.lstm.named_parameters():
            if name.startswith(("weight_c", "ln_")):  # peepholes and LayerNorm gains and biases
                p.copy_(torch.randn_like(p) * 0.5 + ("ln_" in name and "weight" in name))
    return model


def _layers_with_inputs(model: SequenceClassifier, rec, x: Tensor):
    """Each layer record with its input (B, T, I), its weights and the states before each step."""
    d = model.lstm.num_directions
    for r in rec.layers:
        inp = x if r.layer == 0 else torch.cat([q.h for q in rec.layers[(r.layer - 1) * d : r.layer * d]], 2)
        suffix = f"_l{r.layer}" + ("_reverse" if r.direction else "")
        yield r, inp, model.lstm.layer_weights(r.layer, r.direction), suffix, _previous(r, r.h), _previous(r, r.c)


def _close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def _ln(v: Tensor, gain: Tensor, bias: Tensor | float = 0.0) -> Tensor:
    """Ba et al.'s LayerNorm written out: biased variance over the features, eps 1e-5."""
    mean = v.mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(((v - mean) ** 2).mean(-1, keepdim=True) + 1e-5) * gain + bias


def test_plain_cell_has_no_extra_and_names_are_checked() -> None:
    model = _variant("lstm", bidirectional=False)
    r = record(model, torch.randn(2, 4, 5)).get()
    assert r.extra == {}
    with pytest.raises(KeyError, match="unknown gate or signal 'peep_f'; one of i, f, g, o, c, h"):
        r["peep_f"]


def test_peephole_terms_are_p_times_the_cell() -> None:
    model = _variant("peephole", layers=2)
    x = torch.randn(3, 6, 5)
    rec = record(model, x)
    for r, inp, (w_ih, w_hh, b_ih, b_hh, _), suffix, h_prev, c_prev in _layers_with_inputs(model, rec, x):
        p_i, p_f, p_o = (getattr(model.lstm, f"weight_c{gate}{suffix}").detach() for gate in "ifo")
        assert list(r.extra) == ["peep_i", "peep_f", "peep_o"] and r["peep_f"].shape == (3, 6, 7)
        _close(r["peep_i"], p_i * c_prev)  # i and f see the previous cell
        _close(r["peep_f"], p_f * c_prev)
        _close(r["peep_o"], p_o * r.c)  # o sees the new one
        z_i, z_f, _, z_o = (inp @ w_ih.T + h_prev @ w_hh.T + b_ih + b_hh).detach().chunk(4, -1)
        _close(r.f, torch.sigmoid(z_f + r["peep_f"]))  # the terms are what the gates were given
        _close(r.i, torch.sigmoid(z_i + r["peep_i"]))
        _close(r.o, torch.sigmoid(z_o + r["peep_o"]))


@pytest.mark.parametrize("zoneout", [0.0, 0.25])
def test_layernorm_terms_are_the_normalised_pre_activations(zoneout: float) -> None:
    model = _variant("layernorm", zoneout=zoneout)
    x = torch.randn(3, 6, 5)
    rec = record(model, x)
    for r, inp, (w_ih, w_hh, b_ih, b_hh, _), suffix, h_prev, c_prev in _layers_with_inputs(model, rec, x):
        g_ih, g_hh, g_c, b_c = (getattr(model.lstm, f"{n}{suffix}").detach()
                                for n in ("ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias"))
        z = _ln(inp @ w_ih.T.detach(), g_ih) + _ln(h_prev @ w_hh.T.detach(), g_hh) + (b_ih + b_hh).detach()
        _close(torch.cat([r[n] for n in ("z_i", "z_f", "z_g", "z_o")], -1), z)
        _close(r.f, torch.sigmoid(r["z_f"]))
        c_new = r.f * c_prev + r.i * r.g  # the new cell before zoneout: what LN(c') normalises
        _close(r["c_norm"], _ln(c_new, g_c, b_c))
        assert set(r.extra) >= {"z_f", "c_norm"} and ("zone_c" in r.extra) == bool(zoneout)
        if not zoneout:
            _close(r.h, r.o * torch.tanh(r["c_norm"]))


def test_zoneout_terms_are_the_pull_back_to_the_previous_state() -> None:
    model = _variant(zoneout=(0.3, 0.1), layers=2)
    x = torch.randn(3, 6, 5)
    rec = record(model, x)
    torch.testing.assert_close(rec.logits, model(x), atol=1e-5, rtol=1e-5)  # eval: the expectation, as the model
    for r, *_, h_prev, c_prev in _layers_with_inputs(model, rec, x):
        c_new = r.f * c_prev + r.i * r.g
        h_new = r.o * torch.tanh(c_new)
        _close(r["zone_c"], 0.3 * (c_prev - c_new))
        _close(r["zone_h"], 0.1 * (h_prev - h_new))
        _close(r.c, c_new + r["zone_c"])
        _close(r.h, h_new + r["zone_h"])


def test_sampled_zoneout_shows_the_zoned_out_units() -> None:
    """zoneout="sample": 0/1 masks, so a unit's zone_c is nonzero exactly where it kept its previous cell."""
    model = _variant("peephole", zoneout=0.4)
    x = torch.randn(4, 8, 5)
    rec = record(model, x, zoneout="sample", generator=torch.Generator().manual_seed(1))
    assert rec.zoneout == "sample"
    for r, *_, h_prev, c_prev in _layers_with_inputs(model, rec, x):
        held = r["zone_c"] != 0
        assert 0.2 < held.float().mean() < 0.6  # about z of the units
        assert torch.equal(r.c[held], c_prev[held])  # zoned out: the previous value, exactly
        _close(r.c[~held], (r.f * c_prev + r.i * r.g)[~held])  # the others: the new one
        assert torch.equal(r.h[r["zone_h"] != 0], h_prev[r["zone_h"] != 0])
    # the per-step probabilities of the bidirectional model re-run every prefix with the same masks
    torch.testing.assert_close(rec.probs[:, -1], torch.softmax(rec.logits, 1), atol=1e-5, rtol=1e-5)
    again = record(model, x, zoneout="sample", generator=torch.Generator().manual_seed(1))
    other = record(model, x, zoneout="sample", generator=torch.Generator().manual_seed(2))
    assert torch.equal(again.get()["zone_c"], rec.get()["zone_c"])
    assert not torch.equal(other.get()["zone_c"], rec.get()["zone_c"])
    with pytest.raises(LstmlabError, match="zoneout must be one of expected, sample"):
        record(model, x, zoneout="train")
