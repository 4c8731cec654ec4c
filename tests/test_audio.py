import pytest
import soundfile
import torch
import torchaudio.functional as AF
import torchaudio.transforms as T

import mmbook
from mmbook.audio import (
    AudioCNN,
    dct_matrix,
    hz_to_mel,
    log_mel_spectrogram,
    mask_along_axis,
    mel_filterbank,
    mel_spectrogram,
    mel_to_hz,
    mfcc,
    read_wav,
    spec_augment,
    spectrogram,
    stft,
    write_wav,
)

# float32 throughout; differences come from summation order in the FFT/matmul (a few ulps of O(1)-O(1e3) values)
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _wave(batch=(2,), n=8000):
    mmbook.set_seed(0)
    t = torch.arange(n) / 16000
    return torch.sin(2 * torch.pi * 440 * t) * 0.5 + 0.1 * torch.randn(*batch, n)


@pytest.mark.parametrize("norm", [None, "slaney"])
@pytest.mark.parametrize("scale", ["htk", "slaney"])
def test_mel_filterbank_matches_torchaudio(norm, scale):
    ours = mel_filterbank(201, 0.0, 8000.0, 40, 16000, norm=norm, mel_scale=scale)
    ref = AF.melscale_fbanks(201, 0.0, 8000.0, 40, 16000, norm=norm, mel_scale=scale)
    # torchaudio maps the mel points back to Hz in float32, we in float64 (then round): the triangle
    # values in [0, 1] differ by a few float32 ulps after the slope division, so atol 1e-5.
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    ours = mel_filterbank(257, 50.0, 3000.0, 23, 8000, norm=norm, mel_scale=scale)
    ref = AF.melscale_fbanks(257, 50.0, 3000.0, 23, 8000, norm=norm, mel_scale=scale)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 if norm is None else 1e-7)


def test_mel_scale_round_trip():
    f = torch.tensor([0.0, 100.0, 999.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    for scale in ("htk", "slaney"):
        torch.testing.assert_close(mel_to_hz(hz_to_mel(f, scale), scale), f, rtol=1e-12, atol=1e-9)


def test_stft_and_spectrogram_match_torch():
    x = _wave()
    ours = stft(x, n_fft=256, hop_length=64, win_length=200)
    ref = torch.stft(x, 256, 64, 200, window=torch.hann_window(200), center=True, pad_mode="reflect",
                     return_complex=True)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(spectrogram(x, n_fft=400), T.Spectrogram(n_fft=400)(x), **TOL)


def test_mel_spectrogram_and_mfcc_match_torchaudio():
    x = _wave()
    kw = dict(n_fft=400, hop_length=160, n_mels=40, f_min=20.0, f_max=7600.0)
    torch.testing.assert_close(mel_spectrogram(x, 16000, **kw), T.MelSpectrogram(16000, **kw)(x), **TOL)
    kw2 = dict(n_fft=512, n_mels=64, norm="slaney", mel_scale="slaney")
    torch.testing.assert_close(mel_spectrogram(x, 16000, **kw2), T.MelSpectrogram(16000, **kw2)(x), **TOL)
    # dB values are O(10-100); float32 log of matching inputs agrees to ~1e-4 absolute
    torch.testing.assert_close(mfcc(x, 16000, n_mfcc=13, melkwargs=kw),
                               T.MFCC(16000, n_mfcc=13, melkwargs=kw)(x), rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(mfcc(x, 16000, n_mfcc=20, log_mels=True, melkwargs=kw),
                               T.MFCC(16000, n_mfcc=20, log_mels=True, melkwargs=kw)(x), rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(dct_matrix(13, 40), AF.create_dct(13, 40, "ortho"), rtol=1e-6, atol=1e-6)


def test_wav_round_trip_and_soundfile(tmp_path):
    x = _wave(batch=(2,), n=1000).clamp(-1, 1)
    path = tmp_path / "a.wav"
    write_wav(path, x, 16000)
    y, sr = read_wav(path)
    assert sr == 16000 and y.shape == (2, 1000)
    # 16-bit quantisation: written as round(x * 32767), read as k / 32768 (libsndfile's convention), so the
    # error is at most 0.5 / 32767 + |x| / 32768 < 2 / 32768
    torch.testing.assert_close(y, x, rtol=0, atol=2.0 / 32768)
    data, sr2 = soundfile.read(str(path), dtype="float32", always_2d=True)
    assert sr2 == 16000
    torch.testing.assert_close(y, torch.from_numpy(data.T.copy()), rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="sample_rate must be a positive number, got 0"):
        mel_filterbank(201, 0.0, 8000.0, 40, 0)
    with pytest.raises(ValueError, match=r"f_max must be in .*Nyquist.*got 9000"):
        mel_filterbank(201, 0.0, 9000.0, 40, 16000)
    with pytest.raises(ValueError, match="n_mels=128 is too large for n_freqs=33"):
        mel_filterbank(33, 0.0, 8000.0, 128, 16000)
    with pytest.raises(ValueError, match="mel_scale must be 'htk' or 'slaney'"):
        mel_filterbank(201, 0.0, 8000.0, 40, 16000, mel_scale="mel")
    with pytest.raises(ValueError, match=r"waveform must have shape .* got \(1, 1, 1, 100\)"):
        mel_spectrogram(torch.zeros(1, 1, 1, 100))
    with pytest.raises(TypeError, match="floating-point"):
        stft(torch.zeros(1000, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_mfcc must be an int in"):
        mfcc(torch.zeros(2000), n_mfcc=50, melkwargs={"n_mels": 40})
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_wav("does/not/exist.wav")


def test_log_mel_spectrogram_matches_torchaudio_per_example():
    x = _wave(batch=(3,))
    x[1] *= 0.01  # a quiet example: its 80 dB floor must not depend on the loud ones
    ours = log_mel_spectrogram(x, 16000, n_fft=400, hop_length=160, n_mels=40)
    mel = T.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=40)
    ref = T.AmplitudeToDB("power", top_db=80.0)(mel(x).unsqueeze(1)).squeeze(1)  # (batch, 1, ...): one per example
    assert ours.shape == (3, 40, 1 + 8000 // 160)
    # dB of matching float32 powers: |10 log10(a) - 10 log10(b)| ~ 4.3 |a - b| / a ~ 1e-5 relative, on values O(100)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(log_mel_spectrogram(x[1]), ours[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("axis", [-2, -1])
def test_mask_along_axis_reproduces_torchaudio_draws(axis):
    mmbook.set_seed(1)
    spec = torch.randn(4, 2, 40, 101)
    torch.manual_seed(7)
    ours = mask_along_axis(spec, 12, axis, mask_value=-3.0)
    torch.manual_seed(7)
    ref = AF.mask_along_axis_iid(spec, 12, -3.0, spec.ndim + axis)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    masked = ours == -3.0
    # each example's mask is one band (or block of frames) spanning the whole other axis
    other = -1 if axis == -2 else -2
    full = masked.all(dim=other)
    assert torch.equal(full, masked.any(dim=other)) and int(full.sum(dim=-1).max()) <= 12


def test_spec_augment_masks_and_generator():
    spec = torch.randn(8, 40, 101) + 5.0  # no cell equals 0 by chance
    a = spec_augment(spec, 8, 20, 2, 2, generator=torch.Generator().manual_seed(0))
    b = spec_augment(spec, 8, 20, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    zero = a == 0
    assert a.shape == spec.shape and torch.equal(a[~zero], spec[~zero])
    bands = zero.all(dim=-1).sum(dim=-1)  # fully masked mel bands per example
    assert int(bands.max()) <= 2 * 8
    assert torch.equal(spec_augment(spec, 8, 20, 0, 0), spec)


def test_audio_cnn_shapes_and_conv2d_equivalence():
    mmbook.set_seed(0)
    model = AudioCNN(n_mels=40, out_dim=10).eval()
    x = torch.randn(3, 40, 101)
    assert model.features(x).shape == (3, 64, 6) and model.tokens(x).shape == (3, 6, 64)
    assert model(x).shape == (3, 10) and AudioCNN(40, out_dim=None)(x).shape == (3, 64)
    torch.testing.assert_close(model(x), model.head(model.tokens(x).mean(dim=1)), rtol=1e-6, atol=1e-6)
    # independent reference: a temporal convolution over n_mels channels is a 2-D convolution of the
    # (1, n_mels, frames) image with a kernel as tall as the spectrogram and no padding along frequency
    conv = model.body[0]
    ref = torch.nn.functional.conv2d(x.unsqueeze(1), conv.weight.unsqueeze(1), stride=(1, 2), padding=(0, 1))
    torch.testing.assert_close(conv(x), ref.squeeze(2), rtol=1e-5, atol=1e-5)


def test_bad_input_additions():
    with pytest.raises(ValueError, match=r"waveform must be a tensor \(time,\) or \(batch, time\)"):
        log_mel_spectrogram(torch.zeros(1, 1, 1600))
    with pytest.raises(ValueError, match="top_db must be a positive number"):
        log_mel_spectrogram(torch.zeros(1600), top_db=-1)
    with pytest.raises(ValueError, match="axis must be -2 .* or -1"):
        mask_along_axis(torch.zeros(2, 40, 101), 5, 1)
    with pytest.raises(ValueError, match=r"mask_param \(50\) exceeds the size of axis -2 \(40\)"):
        mask_along_axis(torch.zeros(2, 40, 101), 50, -2)
    with pytest.raises(ValueError, match="num_time_masks must be a non-negative int"):
        spec_augment(torch.zeros(2, 40, 101), num_time_masks=-1)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, n_mels=40, frames\), got \(2, 64, 101\)"):
        AudioCNN(40)(torch.zeros(2, 64, 101))
    with pytest.raises(ValueError, match="8 frames are too few"):
        AudioCNN(40)(torch.zeros(2, 40, 8))
    with pytest.raises(TypeError, match="floating-point"):
        AudioCNN(40)(torch.zeros(2, 40, 101, dtype=torch.int64))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        AudioCNN(40, kernel_size=4)


def test_defaults_work_and_match_torchaudio_with_the_same_bands():
    x = _wave()
    ours = mel_spectrogram(x)  # 40 bands: torchaudio's 128 leave filters empty at n_fft=400
    assert ours.shape == (2, 40, 41)
    torch.testing.assert_close(ours, T.MelSpectrogram(n_mels=40)(x), **TOL)
    torch.testing.assert_close(mfcc(x), T.MFCC(melkwargs={"n_mels": 40})(x), rtol=1e-4, atol=2e-4)
    assert mfcc(x).shape == (2, 40, 41)
    for rate in (8000, 22050, 44100, 48000):  # the default fits every common sample rate
        assert mel_spectrogram(torch.zeros(rate // 10), sample_rate=rate).shape[-2] == 40


def test_bad_input_is_named_never_a_plausible_answer(tmp_path):
    x = _wave()
    nan = float("nan")
    with pytest.raises(ValueError, match="hz_to_mel: freq must be finite and >= 0"):
        hz_to_mel(-800.0)  # log10 of a negative number: NaN
    with pytest.raises(ValueError, match="hz_to_mel: freq must be finite and >= 0"):
        hz_to_mel(torch.tensor([100.0, nan]))
    with pytest.raises(TypeError, match="mel_to_hz: mels must be a number or a tensor of numbers, got str"):
        mel_to_hz("10")
    with pytest.raises(ValueError, match="stft: the default hop_length = win_length // 2 needs win_length >= 2"):
        stft(x, n_fft=1)
    with pytest.raises(ValueError, match="stft: pad_mode must be one of 'reflect'"):
        stft(x, pad_mode="bogus")
    with pytest.raises(TypeError, match="stft: center must be True or False, got str"):
        stft(x, center="no")
    with pytest.raises(TypeError, match="stft: window must be a torch.Tensor, got list"):
        stft(x, window=[1.0] * 400)
    with pytest.raises(TypeError, match="stft: window must be a floating-point tensor"):
        stft(x, window=torch.ones(400, dtype=torch.long))
    for power in (nan, float("inf"), 0):
        with pytest.raises(ValueError, match="spectrogram: power must be a positive number"):
            spectrogram(x, power=power)
    mel = mel_spectrogram(x)
    for name, bad in (("top_db", -1.0), ("top_db", nan), ("amin", 0.0), ("amin", nan), ("multiplier", 0.0)):
        with pytest.raises(ValueError, match=f"amplitude_to_db: {name} must be a positive number"):
            mmbook.audio.amplitude_to_db(mel, **{name: bad})
    with pytest.raises(TypeError, match="amplitude_to_db: x must be a floating-point tensor"):
        mmbook.audio.amplitude_to_db(torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="amplitude_to_db: x must not be empty"):
        mmbook.audio.amplitude_to_db(torch.empty(0, 5))
    with pytest.raises(TypeError, match="mfcc: melkwargs must be a dict or None, got list"):
        mfcc(x, melkwargs=[1])
    with pytest.raises(ValueError, match=r"mfcc: melkwargs must hold arguments of mel_spectrogram, got \['bogus'\]"):
        mfcc(x, melkwargs={"bogus": 1})
    with pytest.raises(TypeError, match="mfcc: log_mels must be True or False, got str"):
        mfcc(x, log_mels="yes")
    with pytest.raises(TypeError, match="mfcc: n_mfcc must be an int, got str"):
        mfcc(x, n_mfcc="13")
    with pytest.raises(ValueError, match="write_wav: waveform contains NaN"):  # would be written as silence
        write_wav(tmp_path / "a.wav", torch.full((100,), nan), 16000)
    with pytest.raises(TypeError, match="write_wav: sample_rate must be an int, got float"):
        write_wav(tmp_path / "a.wav", x[0], 16000.5)
    with pytest.raises(TypeError, match="write_wav: path must be a str or a path, got int"):  # not a descriptor
        write_wav(3, x[0], 16000)
    with pytest.raises(ValueError, match="write_wav: waveform must be"):
        write_wav(tmp_path / "a.wav", torch.empty(0), 16000)
    (tmp_path / "junk.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="read_wav: .*junk.wav' is not a WAV file"):
        read_wav(tmp_path / "junk.wav")
    with pytest.raises(ValueError, match="log_mel_spectrogram: top_db must be a positive number or None, got nan"):
        log_mel_spectrogram(x, top_db=nan)
    spec = torch.randn(2, 40, 50)
    with pytest.raises(ValueError, match="mask_along_axis: mask_value must be a finite number"):
        mask_along_axis(spec, 5, -1, mask_value=nan)
    with pytest.raises(TypeError, match="mask_along_axis: generator must be a torch.Generator or None, got int"):
        mask_along_axis(spec, 5, -1, generator=0)
    with pytest.raises(ValueError, match=r"spec_augment: freq_mask_param \(100\) exceeds the size of axis -2"):
        spec_augment(spec, freq_mask_param=100)
    with pytest.raises(TypeError, match="spec_augment: spec must be a torch.Tensor, got list"):
        spec_augment([1.0], num_freq_masks=0, num_time_masks=0)
    with pytest.raises(TypeError, match="AudioCNN: x has dtype torch.float64 but the model's parameters"):
        AudioCNN()(torch.randn(2, 40, 101, dtype=torch.float64))


def test_wav_files_and_half_precision_are_named(tmp_path):
    wave_ = torch.zeros(2, 100)
    # (time, channels) would be written as 100 channels of 2 samples: a valid file of noise
    with pytest.raises(ValueError, match=r"write_wav: waveform must be \(channels, time\), got \(100, 2\): more "
                                         "channels than samples; transpose"):
        write_wav(tmp_path / "a.wav", wave_.T, 16000)
    with pytest.raises(ValueError, match=r"write_wav: waveform must be \(time,\) or \(channels, time\), got \(0, 10\)"):
        write_wav(tmp_path / "a.wav", torch.zeros(0, 10), 16000)  # wave's '# channels not specified'
    with pytest.raises(FileNotFoundError, match="write_wav: the folder of .*no.a.wav' does not exist"):
        write_wav(tmp_path / "no" / "a.wav", wave_, 16000)
    with pytest.raises(FileNotFoundError, match=r"read_wav: no such file .* \(it is a folder\)"):
        read_wav(tmp_path)
    write_wav(tmp_path / "a.wav", wave_, 16000)
    assert read_wav(tmp_path / "a.wav")[0].shape == (2, 100)
    with pytest.raises(TypeError, match=r"stft: waveform must be float32 or float64, got torch.float16; convert"):
        stft(torch.zeros(1000, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"mel_spectrogram: waveform must be float32 or float64, got torch.bfloat16"):
        mel_spectrogram(torch.zeros(1000, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"log_mel_spectrogram: waveform must be a floating-point tensor, got"):
        log_mel_spectrogram(torch.zeros(1000, dtype=torch.long))
    write_wav(tmp_path / "h.wav", torch.zeros(100, dtype=torch.float16), 16000)  # writing needs no FFT
