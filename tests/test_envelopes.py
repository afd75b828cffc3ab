"""Envelope library: known values, range, monotonicity, gradients, state, errors."""

import copy

import pytest
import torch

from envelopes import Envelope, bias_corrected_ema_, envelope_weight, quantiles, shaped_loss

DTYPES = [torch.float32, torch.float64]
SHAPES = ["identity", "step", "linear", "sigmoid"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_known_values(dtype):
    loss = torch.tensor([0.0, 0.5, 0.9, 1.0, 1.1, 1.5, 3.0], dtype=dtype)
    step = envelope_weight(loss, "step", 1.0)
    assert step.tolist() == [0, 0, 0, 1, 1, 1, 1]
    linear = envelope_weight(loss, "linear", 1.0, 0.4)
    torch.testing.assert_close(linear, torch.tensor([0, 0, 0.25, 0.5, 0.75, 1, 1], dtype=dtype))
    sigmoid = envelope_weight(loss, "sigmoid", 1.0, 0.4)
    expected = torch.sigmoid(4 * (loss - 1.0) / 0.4)
    torch.testing.assert_close(sigmoid, expected)
    assert sigmoid[3].item() == 0.5
    assert envelope_weight(loss, "identity").tolist() == [1] * 7
    for w in (step, linear, sigmoid):
        assert w.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_range_and_monotonicity_on_random_inputs(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(4000, generator=gen, dtype=dtype) * 3
    sorted_loss = loss.sort().values
    kwargs = {} if shape == "identity" else {"quantile": 0.7}
    if shape in ("linear", "sigmoid"):
        kwargs["width"] = 0.2
    weight = Envelope(shape, **kwargs).to(dtype).compute_weight(sorted_loss)
    assert weight.shape == loss.shape and weight.dtype == dtype
    assert (weight >= 0).all() and (weight <= 1).all()
    assert (weight[1:] >= weight[:-1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["step", "linear", "sigmoid"])
def test_gradient_equals_weight_times_loss_gradient(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(50, 3, generator=gen, dtype=dtype, requires_grad=True)
    target = torch.randn(50, 3, generator=gen, dtype=dtype)
    loss = (theta - target).pow(2)
    envelope = Envelope(shape, quantile=0.5, **({"width": 0.3} if shape != "step" else {})).to(dtype)
    envelope(loss).sum().backward()
    weight = envelope.weight
    assert not weight.requires_grad
    expected = weight * 2 * (theta.detach() - target)
    torch.testing.assert_close(theta.grad, expected)


def test_shaped_loss_function_matches_module():
    loss = torch.rand(100, 7)
    module = Envelope("linear", threshold=0.4, inverse_slope=0.2)
    torch.testing.assert_close(module(loss), shaped_loss(loss, "linear", 0.4, 0.2))
    assert module.config() == {"shape": "linear", "threshold": 0.4, "inverse_slope": 0.2}


def test_any_shape_quantile_over_all_elements():
    loss = torch.arange(100.0).reshape(10, 10)
    envelope = Envelope("step", quantile=0.5)
    weight = envelope.compute_weight(loss)
    assert weight.shape == (10, 10)
    assert envelope.threshold.item() == pytest.approx(49.5)
    assert weight.sum().item() == 50


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 50_000])
def test_quantiles_match_torch_quantile(n, dtype):
    gen = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=gen, dtype=dtype)
    values[: n // 3] = values[0]  # ties
    levels = [0.0, 0.01, 0.1, 0.3, 0.5, 0.899, 0.9, 1.0]
    expected = torch.quantile(values, torch.tensor(levels, dtype=dtype), interpolation="linear")
    torch.testing.assert_close(quantiles(values, levels), expected)


def test_quantiles_beyond_torch_quantile_size_limit():
    values = torch.arange(20_000_000, dtype=torch.float32).flip(0)
    assert quantiles(values, [0.5]).item() == pytest.approx(9_999_999.5)


def test_bias_correction_first_update_equals_first_observation():
    estimate, trace = torch.zeros(2), torch.zeros(())
    bias_corrected_ema_(estimate, trace, torch.tensor([3.0, -2.0]), 0.1)
    torch.testing.assert_close(estimate, torch.tensor([3.0, -2.0]))
    bias_corrected_ema_(estimate, trace, torch.tensor([5.0, 0.0]), 0.1)
    # trace = 0.1 + 0.1 * 0.9 = 0.19; step = 0.1 / 0.19
    torch.testing.assert_close(estimate, torch.tensor([3.0 + 2 * 0.1 / 0.19, -2.0 + 2 * 0.1 / 0.19]))


def test_adaptive_first_call_uses_batch_quantile():
    loss = torch.rand(1000)
    envelope = Envelope("sigmoid", quantile=0.9, width=0.1, step_size=0.1)
    envelope.compute_weight(loss)
    q = torch.quantile(loss, torch.tensor([0.85, 0.9, 0.95]))
    torch.testing.assert_close(envelope.threshold, q[1])
    torch.testing.assert_close(envelope.inverse_slope, q[2] - q[0])


def test_adaptive_threshold_converges_to_true_quantile():
    gen = torch.Generator().manual_seed(0)
    envelope = Envelope("step", quantile=0.9, step_size=0.05)
    for _ in range(400):
        envelope.compute_weight(torch.randn(256, generator=gen) * 2 + 1)
    true_quantile = 1 + 2 * 1.2815515655446004  # N(1, 2^2) at 0.9
    assert envelope.threshold.item() == pytest.approx(true_quantile, abs=0.05)


def test_step_size_one_means_no_smoothing():
    envelope = Envelope("step", quantile=0.5, step_size=1.0)
    envelope.compute_weight(torch.tensor([0.0, 1.0, 2.0]))
    envelope.compute_weight(torch.tensor([10.0, 11.0, 12.0]))
    assert envelope.threshold.item() == 11.0
    assert envelope.state_dict() == {}


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(0)
    first = Envelope("linear", quantile=0.3, width=0.2, step_size=0.1)
    for _ in range(5):
        first.compute_weight(torch.rand(64, generator=gen))
    state = first.state_dict()
    assert set(state) == {"estimate", "trace"}
    second = Envelope("linear", quantile=0.3, width=0.2, step_size=0.1)
    second.load_state_dict(state)
    batch = torch.rand(64, generator=gen)
    torch.testing.assert_close(second.compute_weight(batch), first.compute_weight(batch))
    torch.testing.assert_close(second.state_dict()["estimate"], first.state_dict()["estimate"])


def test_statistics():
    envelope = Envelope("step", threshold=0.5)
    envelope(torch.tensor([0.1, 0.2, 0.6, 0.9]))
    stats = envelope.statistics()
    assert stats["mean_weight"].item() == 0.5
    assert stats["fraction_attenuated"].item() == 0.5
    assert stats["threshold"] == 0.5
    assert "inverse_slope" not in stats
    sigmoid = Envelope("sigmoid", threshold=0.0, inverse_slope=1.0)
    sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    assert sigmoid.statistics()["fraction_attenuated"].item() == pytest.approx(1 / 3)
    identity = Envelope("identity")
    loss = torch.rand(5)
    assert identity(loss) is loss
    assert identity.statistics() == {"mean_weight": 1.0, "fraction_attenuated": 0.0}


def test_constant_losses_give_a_step_not_nan():
    envelope = Envelope("sigmoid", quantile=0.5, width=0.1)
    weight = envelope.compute_weight(torch.full((10,), 2.0))
    assert torch.isfinite(weight).all()
    assert (weight == 0.5).all()


def test_shape_ignores_unused_parameters():
    assert Envelope("identity", threshold=3.0, width=0.1).config() == {"shape": "identity"}
    assert Envelope("step", threshold=1.0, width=0.1, step_size=0.3).config() == {"shape": "step", "threshold": 1.0}
    assert Envelope("step", quantile=0.9, step_size=0.3).config() == {
        "shape": "step",
        "quantile": 0.9,
        "step_size": 0.3,
    }


def test_compiled_adaptive_envelope_matches_eager():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(500, generator=gen) * (i + 1) for i in range(4)]
    eager = Envelope("sigmoid", quantile=0.9, width=0.1, step_size=0.1)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module.compute_weight, fullgraph=True)
    for batch in batches:
        torch.testing.assert_close(compiled(batch), eager.compute_weight(batch))
    torch.testing.assert_close(compiled_module.estimate, eager.estimate)
    torch.testing.assert_close(compiled_module.trace, eager.trace)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"shape": "cosine", "threshold": 1.0},
            "shape must be one of ['identity', 'step', 'linear', 'sigmoid', 'focal', 'hard_mining'], got 'cosine'",
        ),
        ({"shape": "step", "quantile": 1.5}, "quantile must lie in [0, 1], got 1.5"),
        ({"shape": "step", "quantile": -0.1}, "quantile must lie in [0, 1], got -0.1"),
        ({"shape": "step", "quantile": 0.5, "step_size": 0.0}, "step_size must lie in (0, 1], got 0.0"),
        ({"shape": "step", "quantile": 0.5, "step_size": 1.5}, "step_size must lie in (0, 1], got 1.5"),
        ({"shape": "linear", "threshold": 1.0, "inverse_slope": 0.0}, "inverse_slope must be > 0, got 0.0"),
        ({"shape": "linear", "threshold": 1.0, "inverse_slope": -2.0}, "inverse_slope must be > 0, got -2.0"),
        ({"shape": "step", "threshold": float("nan")}, "threshold must be a finite number, got nan"),
        ({"shape": "step", "threshold": float("inf")}, "threshold must be a finite number, got inf"),
        ({"shape": "sigmoid", "quantile": 0.5, "width": 0.0}, "width must be > 0, got 0.0"),
        ({"shape": "sigmoid", "quantile": 0.5, "width": 2.0}, "width must lie in (0, 1], got 2.0"),
        (
            {"shape": "step"},
            "shape 'step' needs exactly one of threshold (static) or quantile (adaptive), got threshold=None, quantile=None",
        ),
        (
            {"shape": "step", "threshold": 1.0, "quantile": 0.5},
            "shape 'step' needs exactly one of threshold (static) or quantile (adaptive)",
        ),
        (
            {"shape": "linear", "threshold": 1.0},
            "shape 'linear' needs exactly one of inverse_slope (static) or width (adaptive)",
        ),
    ],
)
def test_error_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        Envelope(**kwargs)
    assert str(info.value).startswith(message)


def test_functional_error_messages():
    with pytest.raises(ValueError, match=r"inverse_slope must be > 0, got 0"):
        envelope_weight(torch.rand(3), "linear", 0.5, 0)
    with pytest.raises(ValueError, match=r"quantile level must lie in \[0, 1\], got 2"):
        quantiles(torch.rand(3), [2])
    with pytest.raises(ValueError, match="at least one element"):
        quantiles(torch.zeros(0), [0.5])


def test_a_new_shape_is_one_entry_in_the_shape_table(monkeypatch, compose):
    """README "Extending": a shape is its formula in ``envelopes/shapes.py`` (here added by the test), a config
    file and a test; the Envelope, the bank, ``envelope_weight``, config validation and the report read it."""
    from analysis.tables import shape_order
    from envelopes import EnvelopeBank, shapes
    from runner.config import ConfigError, validate

    def cubic(loss, threshold, span, gamma):  # a linear ramp, cubed: monotone, in [0, 1]
        return ((loss - threshold) / span + 0.5).clamp(0.0, 1.0).pow(3)

    monkeypatch.setitem(shapes.SHAPES, "cubic", shapes.Shape("cubic", cubic, threshold=True, width=True))
    loss = torch.linspace(0.0, 2.0, 101)
    alone = Envelope("cubic", quantile=0.5, width=0.4, step_size=0.5)
    bank = EnvelopeBank([Envelope("identity"), Envelope("cubic", quantile=0.5, width=0.4, step_size=0.5)])
    for scale in (1.0, 2.0):  # two calls: the smoothed state too
        expected = alone.compute_weight(loss * scale)
        assert torch.equal(expected, cubic(loss * scale, alone.threshold, alone.inverse_slope, None))
        weights = bank.compute_weight(torch.stack([loss, loss * scale]))
        assert torch.equal(weights[0], torch.ones_like(loss)) and torch.equal(weights[1], expected)
    assert bank.applies(1) == ("mean_weight", "fraction_attenuated", "threshold", "inverse_slope")
    assert torch.equal(envelope_weight(loss, "cubic", 1.0, 0.5), cubic(loss, 1.0, 0.5, None))
    with pytest.raises(ValueError, match="needs exactly one of inverse_slope"):
        Envelope("cubic", quantile=0.5)
    cfg = compose(
        "envelopes.classification.shape=cubic",
        "envelopes.classification.threshold=0.5",
        "envelopes.classification.inverse_slope=0.2",
    )
    assert validate(cfg)["classification"].config() == {"shape": "cubic", "threshold": 0.5, "inverse_slope": 0.2}
    with pytest.raises(ConfigError, match="'cubic'"):
        validate(compose("envelopes.classification.shape=cubical"))
    assert shape_order("cubic") == len(shapes.SHAPES) - 1 > shape_order("sigmoid")
