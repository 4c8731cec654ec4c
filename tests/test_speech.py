import numpy as np
import pytest
import torch

from mmbook.speech import ESPEAK_SAMPLE_RATE, VOICE_VARIANTS, synthesize, synthesize_many


def test_synthesize_is_deterministic_whatever_came_before():
    first = synthesize_many([{"text": "seven", "voice": "f3"}, {"text": "seven", "voice": "whisper"}])
    # a different history: other utterances first, in another order
    second = synthesize_many([{"text": "one", "voice": "m2"}, {"text": "seven", "voice": "whisper"},
                              {"text": "seven", "voice": "f3"}])
    assert torch.equal(first[0], second[2]) and torch.equal(first[1], second[1])


def test_waveform_properties_and_resampling():
    native = synthesize("zero", voice="m1", sample_rate=ESPEAK_SAMPLE_RATE)
    wave = synthesize("zero", voice="m1", sample_rate=16000)
    assert native.dtype == torch.float32 and native.ndim == 1
    assert 0.05 < native.abs().max() <= 1.0
    assert wave.numel() == -(-native.numel() * 16000 // ESPEAK_SAMPLE_RATE)
    # speaking rate changes duration: faster speech is shorter
    assert synthesize("three", rate=250).numel() < synthesize("three", rate=120).numel()
    # voices differ
    assert not torch.equal(synthesize("two", voice="m1")[:4000], synthesize("two", voice="f4")[:4000])
    assert len(VOICE_VARIANTS) == 17


def test_bad_input():
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        synthesize("  ")
    with pytest.raises(ValueError, match=r"rate must be an int in \[80, 450\], got 10"):
        synthesize("one", rate=10)
    with pytest.raises(ValueError, match="sample_rate must be a positive int"):
        synthesize("one", sample_rate=0)
    with pytest.raises(RuntimeError, match="does not know the voice"):
        synthesize("one", voice="no-such-voice")
    with pytest.raises(ValueError, match="unknown keys"):
        synthesize_many([{"text": "one", "speed": 3}])
    with pytest.raises(TypeError, match="sequence of dicts"):
        synthesize_many("one")


def test_bad_input_is_named_not_spoken():
    # a NUL ends espeak-ng's C string: the rest of the text would silently go unspoken
    with pytest.raises(ValueError, match="synthesize: text must not contain a NUL"):
        synthesize("one\x00two")
    # an unknown variant is ignored by espeak-ng (the base voice speaks instead)
    with pytest.raises(ValueError, match="synthesize: voice 'en\\+zz' names an unknown variant 'zz'"):
        synthesize("one", voice="en+zz")
    with pytest.raises(ValueError, match="synthesize: voice must be a non-empty string, got ' '"):
        synthesize("one", voice=" ")
    with pytest.raises(ValueError, match=r"synthesize: pitch must be an int in \[0, 100\], got nan"):
        synthesize("one", pitch=float("nan"))
    with pytest.raises(ValueError, match=r"synthesize: rate must be an int in \[80, 450\], got 160.0"):
        synthesize("one", rate=160.0)
    # synthesize_many names itself and the request
    with pytest.raises(ValueError, match="synthesize_many: sample_rate must be a positive int, got -1"):
        synthesize_many([{"text": "one"}], sample_rate=-1)
    with pytest.raises(ValueError, match=r"synthesize_many: requests\[1\]: voice must be a non-empty string"):
        synthesize_many([{"text": "one"}, {"text": "two", "voice": None}])
    with pytest.raises(ValueError, match=r"synthesize_many: requests\[0\] has unknown keys \[1\]"):
        synthesize_many([{"text": "one", 1: 2}])
    with pytest.raises(RuntimeError, match="synthesize_many: the espeak-ng worker failed.*does not know the voice"):
        synthesize_many([{"text": "one", "voice": "no-such-voice"}])


def test_numpy_integers_and_other_espeak_variants_are_accepted():
    wave = synthesize("one", voice="en+Andy", rate=np.int64(160), sample_rate=np.int64(16000))
    assert wave.dtype == torch.float32 and wave.numel() > 1000
    assert torch.equal(synthesize("one", voice="m1"), synthesize("one", voice="en+m1"))
