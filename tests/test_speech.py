"""Tests of the eSpeak NG speech synthesis in `datamodules.speech`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from datamodules.speech import SAMPLE_RATE, available_voices, synthesize

SENTENCE = "hello there, how are you"


def rms(wav: np.ndarray) -> float:
    return float(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))


def median_f0(wav: np.ndarray, fmin: float = 60.0, fmax: float = 500.0) -> float:
    """Median fundamental frequency (Hz) over the clearly voiced frames, by autocorrelation."""
    x = wav.astype(np.float64) / 32768.0
    frame, hop = 1024, 512
    min_lag, max_lag = int(SAMPLE_RATE / fmax), int(SAMPLE_RATE / fmin)
    estimates = []
    for start in range(0, len(x) - frame, hop):
        segment = x[start : start + frame] - x[start : start + frame].mean()
        if np.sqrt(np.mean(segment**2)) < 0.02:
            continue
        ac = np.correlate(segment, segment, "full")[frame - 1 :]
        ac = ac / ac[0]
        lag = min_lag + int(np.argmax(ac[min_lag:max_lag]))
        if ac[lag] > 0.5:
            estimates.append(SAMPLE_RATE / lag)
    assert len(estimates) >= 5, "too few voiced frames to estimate a pitch"
    return float(np.median(estimates))


def test_sample_rate_is_22050():
    assert SAMPLE_RATE == 22050


def test_output_is_nonempty_mono_int16():
    wav = synthesize("seven")
    assert isinstance(wav, np.ndarray)
    assert wav.dtype == np.int16
    assert wav.ndim == 1
    assert wav.size > 0


def test_output_is_audible_speech_of_plausible_length():
    wav = synthesize("seven")
    assert rms(wav) > 300.0
    assert 0.2 < wav.size / SAMPLE_RATE < 2.0


def test_longer_text_gives_longer_waveform():
    assert synthesize("seven hundred").size > 1.3 * synthesize("seven").size


def test_higher_rate_gives_shorter_waveform():
    slow, normal, fast = (synthesize("seven", rate=rate).size for rate in (100, 175, 400))
    assert slow > normal > fast
    assert slow > 2 * fast


def test_pitch_changes_waveform():
    low, high = synthesize("seven", pitch=20), synthesize("seven", pitch=80)
    assert low.size != high.size or not np.array_equal(low, high)


def test_pitch_raises_the_fundamental_frequency():
    low = median_f0(synthesize(SENTENCE, pitch=10))
    high = median_f0(synthesize(SENTENCE, pitch=90))
    assert 60.0 < low < high / 1.4


def test_female_variant_speaks_higher_than_default_voice():
    assert median_f0(synthesize(SENTENCE, voice="en+f3")) > 1.5 * median_f0(synthesize(SENTENCE, voice="en"))


def test_same_call_gives_identical_samples():
    first = synthesize(SENTENCE, voice="en+f3", rate=160, pitch=40)
    synthesize("something else entirely", voice="en-us", rate=300, pitch=90)
    second = synthesize(SENTENCE, voice="en+f3", rate=160, pitch=40)
    np.testing.assert_array_equal(first, second)


def test_concurrent_calls_match_sequential_ones():
    words = ["one", "two", "three", "four", "five", "six"]
    expected = [synthesize(word) for word in words]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(synthesize, words))
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(want, have)


@pytest.mark.parametrize("other", ["en-us", "en-gb-scotland", "en+f3", "en+m3"])
def test_different_voices_give_different_waveforms(other):
    base, wav = synthesize("seven"), synthesize("seven", voice=other)
    assert wav.size != base.size or not np.array_equal(wav, base)


def test_available_voices_lists_english_voices_sorted():
    voices = available_voices()
    assert voices
    assert "en" in voices and "en-us" in voices and "en+f3" in voices
    assert voices == sorted(voices)
    assert len(voices) == len(set(voices))
    assert all(voice.startswith("en") for voice in voices)


def test_available_voices_filters_by_prefix():
    us = available_voices("en-us")
    assert "en-us" in us and "en" not in us
    assert set(us) < set(available_voices("en"))
    assert "fr" in available_voices("fr")
    assert available_voices("zz-none") == []


def test_every_listed_english_language_voice_speaks():
    for voice in (voice for voice in available_voices() if "+" not in voice):
        assert rms(synthesize("seven", voice=voice)) > 300.0, voice


def test_unknown_voice_raises_naming_it():
    with pytest.raises(RuntimeError, match="no-such-voice"):
        synthesize("seven", voice="no-such-voice")


def test_unknown_variant_raises_instead_of_falling_back():
    with pytest.raises(RuntimeError, match="no-such-variant"):
        synthesize("seven", voice="en+no-such-variant")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 79},
        {"rate": 451},
        {"pitch": -1},
        {"pitch": 100},
    ],
)
def test_out_of_range_rate_or_pitch_raises(kwargs):
    with pytest.raises(ValueError):
        synthesize("seven", **kwargs)


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_raises(text):
    with pytest.raises(ValueError):
        synthesize(text)


def test_rate_and_pitch_bounds_are_accepted():
    for kwargs in ({"rate": 80}, {"rate": 450}, {"pitch": 0}, {"pitch": 99}):
        assert synthesize("seven", **kwargs).size > 0
