"""Envelope properties on generated inputs (hypothesis): range, monotonicity, gradient, groups, ties."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from envelopes import Envelope, quantiles

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROPERTY = settings(
    max_examples=int(__import__("os").environ.get("LAE_HYPOTHESIS_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Subnormals left out: the runner flushes them to zero (torch.set_flush_denormal), process-wide.
levels = st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False)
widths = st.floats(0.01, 1.0, allow_nan=False)
step_sizes = st.sampled_from([1.0, 0.5, 0.1])
dtypes = st.sampled_from(sorted(DTYPES))
# Finite losses of ordinary magnitude, with repeats drawn on purpose: ties are the hard case.
values = st.floats(-50.0, 50.0, allow_nan=False, width=32, allow_subnormal=False)
losses = st.lists(st.one_of(values, st.sampled_from([0.0, 0.1, 0.3, 1 / 3, 2.7])), min_size=1, max_size=40)


@st.composite
def envelopes(draw):
    shape = draw(st.sampled_from(["identity", "step", "linear", "sigmoid"]))
    kwargs: dict = {}
    if shape != "identity":
        if draw(st.booleans()):
            kwargs["quantile"] = draw(levels)
            kwargs["step_size"] = draw(step_sizes)
        else:
            kwargs["threshold"] = draw(values)
    if shape in ("linear", "sigmoid"):
        if draw(st.booleans()):
            kwargs["width"] = draw(widths)
            kwargs["step_size"] = draw(step_sizes)
        else:
            kwargs["inverse_slope"] = draw(st.floats(1e-3, 10.0))
    return shape, kwargs


def tensor(values, dtype):
    return torch.tensor(values, dtype=DTYPES[dtype])


def assert_same_weights(batched, alone, shape):
    """Bit for bit where the weight is exact arithmetic (identity, step, linear); sigmoid and focal to
    rounding: torch's vectorised exp rounds an element differently at another place in memory."""
    if shape in ("sigmoid", "focal"):
        torch.testing.assert_close(batched, alone)
    else:
        assert torch.equal(batched, alone), (shape, batched, alone)


@PROPERTY
@given(envelopes(), losses, dtypes)
def test_weight_in_unit_interval_and_monotone(spec, loss, dtype):
    shape, kwargs = spec
    loss = tensor(loss, dtype).sort().values
    weight = Envelope(shape, **kwargs).compute_weight(loss)
    assert weight.dtype == loss.dtype
    assert ((weight >= 0) & (weight <= 1)).all()
    assert (weight.diff() >= 0).all()  # sorted losses: non-decreasing weights


@PROPERTY
@given(envelopes(), losses, dtypes)
def test_gradient_is_weight_times_loss_gradient(spec, loss, dtype):
    shape, kwargs = spec
    x = tensor(loss, dtype).requires_grad_()
    envelope = Envelope(shape, **kwargs)
    out = envelope(x.square())
    out.sum().backward()
    weight = torch.ones_like(x) if envelope.weight is None else envelope.weight
    torch.testing.assert_close(x.grad, weight * 2 * x.detach())


@PROPERTY
@given(envelopes(), st.lists(losses.filter(lambda v: len(v) >= 2), min_size=2, max_size=4), dtypes)
def test_a_bank_of_one_envelope_per_group_equals_separate_envelopes(spec, groups, dtype):
    from envelopes import EnvelopeBank

    shape, kwargs = spec
    n = min(len(g) for g in groups)
    batches = [tensor([g[:n] for g in groups], dtype), tensor([g[-n:] for g in groups], dtype)]
    grouped = EnvelopeBank([Envelope(shape, **kwargs) for _ in groups])
    singles = [Envelope(shape, **kwargs) for _ in groups]
    for batch in batches:  # two calls: smoothed state must follow each group alone
        together = grouped.compute_weight(batch)
        for i, single in enumerate(singles):
            alone = single.compute_weight(batch[i])
            assert_same_weights(together[i], alone, shape)
            if kwargs.get("quantile") is not None:
                assert grouped.threshold[i] == single.threshold


@PROPERTY
@given(st.floats(1e-6, 1e4, allow_nan=False), st.integers(1, 9), levels, widths, dtypes)
def test_all_equal_batch_threshold_is_the_value_and_span_zero(value, n, quantile, width, dtype):
    loss = torch.full((n,), value, dtype=DTYPES[dtype])
    tied = loss[0]
    from envelopes import EnvelopeBank

    def build(groups, shape, **kwargs):
        if groups is None:
            return Envelope(shape, **kwargs)
        return EnvelopeBank([Envelope(shape, **kwargs) for _ in range(groups)])

    for groups in (None, 3):
        batch = loss if groups is None else loss.expand(groups, n)
        step = build(groups, "step", quantile=quantile)
        assert (step.compute_weight(batch) == 1).all()
        assert (step.threshold == tied).all()
        for shape in ("linear", "sigmoid"):
            envelope = build(groups, shape, quantile=quantile, width=width)
            assert (envelope.compute_weight(batch) == 0.5).all()
            assert (envelope.threshold == tied).all() and (envelope.inverse_slope == 0).all()


@PROPERTY
@given(losses.filter(lambda v: len(v) >= 2), levels, widths, dtypes)
@example([0.0] * 7 + [37.0], 0.8533119658049377, 0.010000000000000002, "float32")  # a float32 level's rounding
def test_adaptive_parameters_equal_exact_quantiles(loss, quantile, width, dtype):
    loss = tensor(loss, dtype)
    envelope = Envelope("linear", quantile=quantile, width=width)
    envelope.compute_weight(loss)
    lo, hi = max(quantile - width / 2, 0.0), min(quantile + width / 2, 1.0)
    # the reference in float64: torch.quantile takes its levels in the data's dtype, and a float32 level is off
    # by its rounding (0.8533 over [0 x 7, 37] moved the quantile by 1e-5), which the envelope's levels are not
    levels = torch.tensor([quantile, lo, hi], dtype=torch.float64)
    exact = torch.quantile(loss.double(), levels).to(loss.dtype)
    # wherever the order statistics around a level tie, the level is that value exactly
    sorted_loss = loss.sort().values
    position = quantile * (len(loss) - 1)
    below, above = sorted_loss[int(position)], sorted_loss[min(int(position) + 1, len(loss) - 1)]
    if below == above:
        assert envelope.threshold == below
    torch.testing.assert_close(envelope.threshold, exact[0])
    torch.testing.assert_close(envelope.inverse_slope, exact[2] - exact[1])
    torch.testing.assert_close(quantiles(loss, [quantile, lo, hi]), exact)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("value", [0.1, 0.3, 1 / 3, 2.7, 7.77])
def test_two_equal_losses_keep_their_gradient(value, dtype):
    # float32 0.1 and float64 0.3 once gave T one ulp above the tied losses: weight 0, no gradient
    x = torch.full((2,), value, dtype=DTYPES[dtype], requires_grad=True)
    envelope = Envelope("step", quantile=0.1, step_size=1.0)
    envelope(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]
    for shape in ("linear", "sigmoid"):
        assert Envelope(shape, quantile=0.1, width=0.2).compute_weight(x).tolist() == [0.5, 0.5]


def test_ties_exact_under_torch_compile():
    envelope = Envelope("linear", quantile=0.1, width=0.2)
    compiled = torch.compile(envelope.compute_weight, fullgraph=True, backend="aot_eager")
    for dtype in DTYPES.values():
        for value in (0.1, 0.3, 2.7):
            weight = compiled(torch.full((2,), value, dtype=dtype))
            assert weight.tolist() == [0.5, 0.5]
            assert (
                envelope.threshold == value
                if dtype == torch.float64
                else envelope.threshold == torch.tensor(value, dtype=dtype)
            )


@st.composite
def any_envelope(draw):
    shape = draw(st.sampled_from(["identity", "step", "linear", "sigmoid", "focal", "hard_mining"]))
    if shape == "focal":
        return {"shape": shape, "gamma": draw(st.sampled_from([0.5, 2.0]))}
    if shape == "hard_mining":
        return {"shape": shape, "fraction": draw(st.floats(0.05, 1.0))}
    return dict(zip(("shape", "kwargs"), draw(envelopes())))


@PROPERTY
@given(st.lists(any_envelope(), min_size=1, max_size=6), st.integers(1, 12), dtypes, st.data())
def test_a_bank_equals_one_envelope_per_group(specs, n, dtype, data):
    from envelopes import EnvelopeBank

    configs = [{"shape": s["shape"], **s.get("kwargs", {})} if "kwargs" in s else s for s in specs]
    singles = [Envelope(**c) for c in configs]
    bank = EnvelopeBank([Envelope(**c) for c in configs])
    for _ in range(3):  # three calls: each group's smoothed state follows its own losses
        batch = tensor(
            data.draw(
                st.lists(
                    st.lists(st.one_of(values, st.just(0.3)), min_size=n, max_size=n),
                    min_size=len(configs),
                    max_size=len(configs),
                )
            ),
            dtype,
        )
        weights = bank.compute_weight(batch)
        stats = bank.statistics()
        for i, single in enumerate(singles):
            alone = single.compute_weight(batch[i])
            assert_same_weights(weights[i], alone, single.shape)
            if isinstance(single.threshold, torch.Tensor) or single.threshold is not None:
                assert bank.threshold[i] == torch.as_tensor(single.threshold, dtype=bank.threshold.dtype)
            if isinstance(single.inverse_slope, torch.Tensor):
                assert bank.inverse_slope[i] == single.inverse_slope
            single_stats = single.statistics()
            for key in bank.applies(i):
                expected = torch.as_tensor(single_stats[key], dtype=stats[key].dtype)
                if single.shape in ("sigmoid", "focal") and key in ("mean_weight", "fraction_attenuated"):
                    torch.testing.assert_close(stats[key][i], expected, atol=1.0 / n + 1e-6, rtol=1e-6)
                else:
                    assert stats[key][i] == expected, (key, configs[i])


@PROPERTY
@given(
    st.lists(
        st.one_of(values, st.sampled_from([0.0, -0.0, 0.3, float("inf"), -float("inf"), float("nan")])),
        min_size=3,
        max_size=60,
    ),
    st.integers(1, 3),
    dtypes,
)
def test_the_banks_row_sort_is_torchs_sort(row, groups, dtype):
    # NumPy's sort on the CPU: the same values in the same order as torch's, NaN last, ties and infinities kept
    from envelopes.bank import sort_rows

    batch = tensor([row[g:] + row[:g] for g in range(groups)], dtype)
    got, expected = sort_rows(batch), batch.sort(dim=-1).values
    assert got.dtype == batch.dtype and got.shape == batch.shape
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(nan=7.0), expected.nan_to_num(nan=7.0))


smoothing_steps = st.floats(1e-3, 1.0, allow_nan=False)


@PROPERTY
@given(smoothing_steps, values, st.lists(values, min_size=1, max_size=6), st.integers(1, 9), dtypes)
@example(0.3381370949060344, -0.2753029465675354, [0.0], 7, "float64")  # once 1 - 1 ulp: every loss dropped
@example(0.3381370949060344, -0.2753029465675354, [0.0], 7, "float32")
def test_the_ema_starts_at_the_observation_and_stays_within_the_observations(step_size, first, later, n, dtype):
    from envelopes import EnvelopeBank

    dtype_ = DTYPES[dtype]
    single = Envelope("step", quantile=0.5, step_size=step_size).to(dtype_)
    bank = EnvelopeBank([Envelope("step", quantile=0.5, step_size=step_size)]).to(dtype_)
    batch = torch.full((n,), first, dtype=dtype_)
    # the first update is the observation exactly: a batch of equal losses meets its own threshold
    assert single.compute_weight(batch).tolist() == [1.0] * n
    assert bank.compute_weight(batch[None]).tolist() == [[1.0] * n]
    assert single.threshold == batch[0] and bank.threshold[0] == batch[0]
    seen = [torch.tensor(first, dtype=dtype_)]
    for value in later:
        batch = torch.full((n,), value, dtype=dtype_)
        seen.append(batch[0])
        single.compute_weight(batch)
        bank.compute_weight(batch[None])
        low, high = min(seen), max(seen)
        assert low <= single.threshold <= high
        assert torch.equal(bank.threshold[0], single.threshold)  # the same arithmetic, bit for bit


def test_a_bank_in_float64_smooths_with_float64_step_sizes():
    from envelopes import EnvelopeBank

    envelopes = [
        Envelope("step", quantile=0.5, step_size=0.1),
        Envelope("linear", quantile=0.3, width=0.2, step_size=0.3),
    ]
    singles = [Envelope(e.shape, quantile=e.quantile, width=e.width, step_size=e.step_size).double() for e in envelopes]
    bank = EnvelopeBank(envelopes).double()
    assert bank.step_size.dtype == torch.float64 and bank.step_size[0].item() == 0.1
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = torch.randn(2, 16, generator=generator, dtype=torch.float64)
        weights = bank.compute_weight(batch)
        for i, single in enumerate(singles):
            assert torch.equal(weights[i], single.compute_weight(batch[i]))
            assert torch.equal(bank.threshold[i], single.threshold)
